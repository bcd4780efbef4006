"""Task datasets: the example and task types, and the helpers every loader shares.

Splits and subsets are deterministic and independent of any training seed:

* a *hash split* sends an example to dev when the SHA-256 of its key (the text, or the article
  title) falls in the first ``dev_fraction`` of the hash range, so the split never changes
  across runs, seeds, machines or Python versions, and duplicates of a text stay together;
* a *subset* (``train_limit`` / ``dev_limit``) is the first ``limit`` indices of a permutation
  drawn with :class:`random.Random` and ``SUBSET_SEED``, put back in their original order, so
  every method gets the same examples and a smaller subset is contained in a larger one.
"""

from __future__ import annotations

import csv
import hashlib
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from senslora.files import jsonl_records

__all__ = [
    "LOCAL_DEV_FRACTION",
    "MAX_BAD_ROW_FRACTION",
    "SUBSET_SEED",
    "ClassificationTask",
    "Example",
    "GenerationExample",
    "GenerationTask",
    "RowTally",
    "find_dev_file",
    "hash_fraction",
    "hash_split",
    "iter_records",
    "require_file",
    "select_subset",
    "split_local_file",
]

SUBSET_SEED = 0
"""Seed of ``train_limit`` / ``dev_limit`` subsets: fixed, never the training seed."""
LOCAL_DEV_FRACTION = 0.1
"""Share of a local file's examples held out for dev when no dev file is beside it."""
MAX_BAD_ROW_FRACTION = 0.01
"""Malformed rows are skipped with a warning; more than this fraction of a file is an error."""

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One classification or regression example."""

    text_a: str
    text_b: str | None
    """Second sentence of a pair task, else None."""
    label: int | float
    """Class index, or a float score for regression (STS-B)."""


@dataclass(frozen=True)
class GenerationExample:
    """One instruction-following example, as plain text (no chat template)."""

    prompt: str
    response: str


def _check_splits(name: str, train: Sequence[Any], dev: dict[str, Sequence[Any]]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if not train:
        raise ValueError(f"task {name!r}: expected at least one training example, got none")
    if not dev or any(not examples for examples in dev.values()):
        sizes = {split: len(examples) for split, examples in dev.items()}
        raise ValueError(f"task {name!r}: expected non-empty dev splits, got sizes {sizes}")


@dataclass(frozen=True)
class ClassificationTask:
    """A sentence (pair) classification or regression task with its evaluation metrics."""

    name: str
    """Spec-like name, e.g. 'glue:rte', 'rotten_tomatoes', 'csv:/abs/path.csv'."""
    train: tuple[Example, ...]
    dev: dict[str, tuple[Example, ...]]
    """Split name -> examples: {'dev': ...}, or MNLI's {'matched': ..., 'mismatched': ...}."""
    num_labels: int
    """Number of classes; 1 means regression (STS-B)."""
    metrics: tuple[str, ...]
    """Metric names of :mod:`senslora.finetune.evaluation`, e.g. ('accuracy', 'f1')."""
    main_metric: str
    """The metric tables report; 'combined' is the mean of 'pearson' and 'spearman'."""
    label_names: tuple[str, ...] | None
    """Name of each class index, or None (regression, or integer labels without names)."""
    kind: str = "classification"

    def __post_init__(self) -> None:
        _check_splits(self.name, self.train, self.dev)
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int):
            raise ValueError(f"num_labels must be an integer, got {self.num_labels!r}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        allowed = set(self.metrics)
        if {"pearson", "spearman"} <= allowed:
            allowed.add("combined")
        if self.main_metric not in allowed:
            raise ValueError(
                f"main_metric must be one of {sorted(allowed)}, got {self.main_metric!r}"
            )
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(
                f"expected {self.num_labels} label names, got {len(self.label_names)}: "
                f"{self.label_names}"
            )


@dataclass(frozen=True)
class GenerationTask:
    """An instruction -> response task evaluated by BLEU-4 and ROUGE."""

    name: str
    train: tuple[GenerationExample, ...]
    dev: dict[str, tuple[GenerationExample, ...]]
    metrics: tuple[str, ...] = ("bleu4", "rouge1", "rougeL")
    main_metric: str = "rougeL"
    kind: str = "generation"

    def __post_init__(self) -> None:
        _check_splits(self.name, self.train, self.dev)
        if self.main_metric not in self.metrics:
            raise ValueError(f"main_metric must be one of {self.metrics}, got {self.main_metric!r}")


# ---------------------------------------------------------------------------------------
# Deterministic splits and subsets


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone: the first 8 bytes of its SHA-256."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(
    items: Sequence[T], key: Callable[[T], str], dev_fraction: float
) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """(train, dev): items whose ``hash_fraction(key(item)) < dev_fraction`` go to dev.

    Order is kept within each part. Raises ValueError when either part comes out empty.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    train, dev = [], []
    for item in items:
        (dev if hash_fraction(key(item)) < dev_fraction else train).append(item)
    if not train or not dev:
        raise ValueError(
            f"hash split of {len(items)} items with dev_fraction={dev_fraction} gave "
            f"{len(train)} train and {len(dev)} dev items; expected both non-empty"
        )
    return tuple(train), tuple(dev)


def split_local_file(
    items: Sequence[T], key: Callable[[T], str], path: Path
) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """(train, dev) of a local file without a dev file: a hash split of LOCAL_DEV_FRACTION."""
    try:
        return hash_split(items, key, LOCAL_DEV_FRACTION)
    except ValueError as error:
        raise ValueError(
            f"{path}: {error}; put a dev file {path.stem}.dev{path.suffix} beside it"
        ) from error


def select_subset(items: Sequence[T], limit: int | None, seed: int = SUBSET_SEED) -> tuple[T, ...]:
    """``limit`` items chosen with ``seed``, in their original order; all items if ``limit`` is
    None or at least ``len(items)``. Subsets are nested: a smaller limit picks a subset of a
    larger one (the first indices of one seeded permutation)."""
    if limit is None:
        return tuple(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= len(items):
        return tuple(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return tuple(items[index] for index in sorted(order[:limit]))


# ---------------------------------------------------------------------------------------
# Malformed rows


class RowTally:
    """Counts good and malformed rows of one file; :meth:`finish` warns or raises.

    Malformed rows are skipped with one warning per file; more than
    ``MAX_BAD_ROW_FRACTION`` of the rows malformed raises ValueError.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.good = 0
        self.bad: list[tuple[int, str]] = []

    def ok(self) -> None:
        self.good += 1

    def skip(self, line: int, reason: str) -> None:
        self.bad.append((line, reason))

    def finish(self) -> None:
        total = self.good + len(self.bad)
        if total == 0:
            raise ValueError(f"{self.where}: expected at least one data row, found none")
        if not self.bad:
            return
        examples = "; ".join(f"line {line}: {reason}" for line, reason in self.bad[:3])
        message = f"{self.where}: {len(self.bad)} malformed rows of {total} ({examples})"
        if len(self.bad) > MAX_BAD_ROW_FRACTION * total:
            raise ValueError(
                f"{message}; more than {MAX_BAD_ROW_FRACTION:.0%} of the rows are malformed"
            )
        warnings.warn(f"skipped {message}", UserWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------
# CSV / JSONL records


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    with path.open(encoding="utf-8-sig", newline="") as stream:
        reader = csv.DictReader(stream)
        if not reader.fieldnames:
            return
        for row in reader:
            broken = None in row or any(value is None for value in row.values())
            yield reader.line_num, None if broken else row


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record) of a .csv (header row) or .jsonl file; None for a malformed row
    (wrong number of CSV fields, invalid JSON, a JSON value that is not an object)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".jsonl":
        return ((number, record) for number, record, _ in jsonl_records(path))
    raise ValueError(f"{path}: expected a .csv or .jsonl file, found {suffix or 'no extension'!r}")


def find_dev_file(path: Path) -> Path | None:
    """The dev file beside ``path``: ``<stem>.dev<ext>``, else ``dev<ext>``, else None."""
    for candidate in (
        path.with_name(f"{path.stem}.dev{path.suffix}"),
        path.with_name(f"dev{path.suffix}"),
    ):
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    return None


def require_file(path: Path, layout: str) -> Path:
    """``path`` if it is a file; FileNotFoundError naming it and the expected layout if not."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {layout}")
    return path
