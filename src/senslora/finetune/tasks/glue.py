"""GLUE tasks from the standard ``glue_data`` TSV folders or from the Hugging Face hub.

Label indices follow the hub's ``nyu-mll/glue`` dataset, so a model trained on either source
predicts the same classes:

======  ==========================================  ============================
task    labels (index order)                        metrics (main first)
======  ==========================================  ============================
cola    unacceptable, acceptable                    matthews
sst2    negative, positive                          accuracy
mrpc    not_equivalent, equivalent                  accuracy, f1
qqp     not_duplicate, duplicate                    accuracy, f1
stsb    float score 0..5 (num_labels 1)             combined = mean(pearson, spearman)
mnli    entailment, neutral, contradiction          accuracy (dev: matched, mismatched)
qnli    entailment, not_entailment                  accuracy
rte     entailment, not_entailment                  accuracy
wnli    not_entailment, entailment                  accuracy
======  ==========================================  ============================

The TSV files are read with :mod:`csv` and ``quoting=csv.QUOTE_NONE`` (quotes belong to the
text), as UTF-8 with an optional BOM (MRPC's header starts with one). CoLA has no header.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from senslora.finetune.tasks.base import ClassificationTask, Example, RowTally

__all__ = ["GLUE_TASKS", "HUB_DATASET", "GlueSpec", "load_glue", "normalize_glue_name"]

HUB_DATASET = "nyu-mll/glue"
"""The hub id of GLUE (the old name 'glue' redirects to it)."""
_NLI = ("entailment", "not_entailment")


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task keeps its columns, labels and splits."""

    folder: str
    """Folder name in glue_data, e.g. 'SST-2'."""
    text_a: str
    text_b: str | None
    label: str
    """Column names in the TSV header (or in ``columns`` for a header-less file)."""
    label_kind: str
    """'index' (a digit), 'name' (one of label_names) or 'score' (a float 0..5)."""
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    hub_text: tuple[str, str | None]
    """Text columns of the hub dataset."""
    dev_files: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)
    """(split name, file name) of each dev split."""
    hub_splits: tuple[tuple[str, str], ...] = (("dev", "validation"),)
    """(split name, hub split) of each dev split."""
    columns: tuple[str, ...] | None = None
    """Column names of a file without a header row (CoLA); None: the file has a header."""

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        folder="CoLA", text_a="sentence", text_b=None, label="label", label_kind="index",
        label_names=("unacceptable", "acceptable"), metrics=("matthews",),
        main_metric="matthews", hub_text=("sentence", None),
        columns=("source", "label", "mark", "sentence"),
    ),
    "sst2": GlueSpec(
        folder="SST-2", text_a="sentence", text_b=None, label="label", label_kind="index",
        label_names=("negative", "positive"), metrics=("accuracy",),
        main_metric="accuracy", hub_text=("sentence", None),
    ),
    "mrpc": GlueSpec(
        folder="MRPC", text_a="#1 String", text_b="#2 String", label="Quality",
        label_kind="index", label_names=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"), main_metric="accuracy", hub_text=("sentence1", "sentence2"),
    ),
    "qqp": GlueSpec(
        folder="QQP", text_a="question1", text_b="question2", label="is_duplicate",
        label_kind="index", label_names=("not_duplicate", "duplicate"),
        metrics=("accuracy", "f1"), main_metric="accuracy", hub_text=("question1", "question2"),
    ),
    "stsb": GlueSpec(
        folder="STS-B", text_a="sentence1", text_b="sentence2", label="score",
        label_kind="score", label_names=None, metrics=("pearson", "spearman"),
        main_metric="combined", hub_text=("sentence1", "sentence2"),
    ),
    "mnli": GlueSpec(
        folder="MNLI", text_a="sentence1", text_b="sentence2", label="gold_label",
        label_kind="name", label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",), main_metric="accuracy", hub_text=("premise", "hypothesis"),
        dev_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
        hub_splits=(("matched", "validation_matched"), ("mismatched", "validation_mismatched")),
    ),
    "qnli": GlueSpec(
        folder="QNLI", text_a="question", text_b="sentence", label="label", label_kind="name",
        label_names=_NLI, metrics=("accuracy",), main_metric="accuracy",
        hub_text=("question", "sentence"),
    ),
    "rte": GlueSpec(
        folder="RTE", text_a="sentence1", text_b="sentence2", label="label", label_kind="name",
        label_names=_NLI, metrics=("accuracy",), main_metric="accuracy",
        hub_text=("sentence1", "sentence2"),
    ),
    "wnli": GlueSpec(
        folder="WNLI", text_a="sentence1", text_b="sentence2", label="label",
        label_kind="index", label_names=("not_entailment", "entailment"),
        metrics=("accuracy",), main_metric="accuracy", hub_text=("sentence1", "sentence2"),
    ),
}  # fmt: skip


def normalize_glue_name(name: str) -> str:
    """'SST-2' -> 'sst2', 'STS-B' -> 'stsb'; ValueError listing the tasks for an unknown one."""
    key = name.strip().lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE_TASKS)}")
    return key


# ---------------------------------------------------------------------------------------
# Labels


def _parse_label(raw: str, spec: GlueSpec) -> int | float:
    """The label of a TSV cell; ValueError with the reason when it is not valid."""
    raw = raw.strip()
    if spec.label_kind == "score":
        score = float(raw)
        if not (math.isfinite(score) and 0.0 <= score <= 5.0):
            raise ValueError(f"score {raw!r} outside 0..5")
        return score
    names = spec.label_names or ()
    if spec.label_kind == "name":
        if raw not in names:
            raise ValueError(f"label {raw!r} not in {names}")
        return names.index(raw)
    if not raw.isdigit() or int(raw) >= len(names):
        raise ValueError(f"label {raw!r} not an index below {len(names)}")
    return int(raw)


# ---------------------------------------------------------------------------------------
# glue_data TSV files


def _column_positions(header: list[str], spec: GlueSpec, path: Path) -> tuple[int, int | None, int]:
    names = [name.strip() for name in header]
    wanted = [spec.text_a, spec.label] + ([spec.text_b] if spec.text_b else [])
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ValueError(
            f"{path}: expected columns {wanted} in the header, missing {missing}; found {names}"
        )
    text_b = names.index(spec.text_b) if spec.text_b else None
    return names.index(spec.text_a), text_b, names.index(spec.label)


def _row_example(
    row: list[str], width: int, positions: tuple[int, int | None, int], spec: GlueSpec
) -> Example:
    """The example of one TSV row; ValueError with the reason for a malformed row."""
    if len(row) != width:
        raise ValueError(f"expected {width} tab-separated fields, found {len(row)}")
    index_a, index_b, index_label = positions
    text_a = row[index_a].strip()
    text_b = row[index_b].strip() if index_b is not None else None
    if not text_a or text_b == "":
        raise ValueError("empty text")
    return Example(text_a, text_b, _parse_label(row[index_label], spec))


def read_glue_tsv(path: Path, spec: GlueSpec) -> tuple[Example, ...]:
    """The examples of one glue_data TSV file; malformed rows skipped (see RowTally)."""
    tally = RowTally(str(path))
    examples = []
    with path.open(encoding="utf-8-sig", newline="") as stream:
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(spec.columns) if spec.columns else next(reader, None)
        if header is None:
            raise ValueError(f"{path}: expected a header row, found an empty file")
        positions = _column_positions(header, spec, path)
        for row in reader:
            if not row:  # blank line
                continue
            try:
                examples.append(_row_example(row, len(header), positions, spec))
            except ValueError as error:
                tally.skip(reader.line_num, str(error))
            else:
                tally.ok()
    tally.finish()
    return tuple(examples)


def _glue_files(glue_dir: Path, spec: GlueSpec) -> tuple[Path, dict[str, Path]]:
    folder = glue_dir / spec.folder
    names = ["train.tsv"] + [name for _, name in spec.dev_files]
    layout = f"the glue_data layout <glue_dir>/{spec.folder}/{{{','.join(names)}}}"
    if not glue_dir.is_dir():
        raise FileNotFoundError(f"GLUE folder {glue_dir} not found; expected {layout}")
    paths = [folder / name for name in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected {layout}")
    return paths[0], {split: folder / name for split, name in spec.dev_files}


# ---------------------------------------------------------------------------------------
# Hugging Face hub


def _check_hub_labels(split: Any, spec: GlueSpec, where: str) -> None:
    """The hub's class names must match the fixed order of this module."""
    features = getattr(split, "features", None) or {}
    names = getattr(features.get("label"), "names", None)
    if names is not None and spec.label_names is not None and tuple(names) != spec.label_names:
        raise ValueError(f"{where}: expected label names {spec.label_names}, found {names}")


def _hub_examples(split: Any, spec: GlueSpec, where: str) -> tuple[Example, ...]:
    _check_hub_labels(split, spec, where)
    column_a, column_b = spec.hub_text
    tally = RowTally(where)
    examples = []
    for number, row in enumerate(split, start=1):
        text_a = str(row[column_a] or "").strip()
        text_b = str(row[column_b] or "").strip() if column_b else None
        label = row["label"]
        if not text_a or text_b == "" or label is None or label < 0:  # -1: unlabeled
            tally.skip(number, "empty text or missing label")
            continue
        tally.ok()
        examples.append(
            Example(text_a, text_b, float(label) if spec.label_kind == "score" else int(label))
        )
    tally.finish()
    return tuple(examples)


def _load_hub(
    key: str, spec: GlueSpec
) -> tuple[tuple[Example, ...], dict[str, tuple[Example, ...]]]:
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(
            f"glue:{key} without glue_dir reads the Hugging Face hub, which needs the "
            '`datasets` package: pip install "senslora[hub]" (or pass glue_dir)'
        ) from error
    dataset = load_dataset(HUB_DATASET, key)
    where = f"hf:{HUB_DATASET}/{key}"
    train = _hub_examples(dataset["train"], spec, f"{where}/train")
    dev = {
        split: _hub_examples(dataset[hub_split], spec, f"{where}/{hub_split}")
        for split, hub_split in spec.hub_splits
    }
    return train, dev


def load_glue(name: str, glue_dir: str | Path | None = None) -> ClassificationTask:
    """A GLUE task from ``glue_dir`` (glue_data layout) or, when None, the Hugging Face hub."""
    key = normalize_glue_name(name)
    spec = GLUE_TASKS[key]
    if glue_dir is None:
        train, dev = _load_hub(key, spec)
    else:
        train_path, dev_paths = _glue_files(Path(glue_dir).expanduser(), spec)
        train = read_glue_tsv(train_path, spec)
        dev = {split: read_glue_tsv(path, spec) for split, path in dev_paths.items()}
    return ClassificationTask(
        name=f"glue:{key}",
        train=train,
        dev=dev,
        num_labels=spec.num_labels,
        metrics=spec.metrics,
        main_metric=spec.main_metric,
        label_names=spec.label_names,
    )
