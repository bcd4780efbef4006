"""Methods x tasks x seeds from a TOML spec: run what is not finished, aggregate the rest.

A spec::

    out = "runs/glue-minilm"
    methods = ["lora", "senslora", "adalora"]
    tasks = ["glue:rte", "glue:mrpc"]
    seeds = [0, 1, 2]
    references = ["lora", "senslora"]   # paired comparisons (default: lora, when in the grid)

    [defaults]                 # any TrainConfig field
    model = "minilm"
    glue_dir = "../shared/data/glue"
    epochs = 3

    [overrides."glue:sst2"]    # per-task TrainConfig fields
    train_limit = 4000

    [rows.senslora-filtered]   # a named row: a method with its own TrainConfig fields
    method = "senslora"        # listed in ``methods`` by its row name
    outlier_factor = 10.0

    metric = "nll"             # the table's metric (default: the task's main metric)
    also = ["rougeL", "bleu4"] # more tables, one per metric, in results.md and results.json

    [questions]                # "does A beat B?", answered in results.md (tables.answer_questions)
    "Does the sensitivity beat the size prior?" = ["senslora", "size-prior"]

With ``eval_at_start = true`` the step-0 evaluation of the first reference (for LoRA-family
methods, B = 0: the untuned model) becomes an extra ``untuned`` row.

Each run lives in ``out/<task>/<method>/seed<k>/results.json``; a run with that file is finished
and never re-run, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from senslora.files import write_text_atomic
from senslora.finetune.config import TrainConfig
from senslora.finetune.tables import (
    UNTUNED,
    aggregate,
    answer_questions,
    render_markdown,
    render_questions,
)

logger = logging.getLogger(__name__)
SPEC_KEYS = {
    "out",
    "methods",
    "tasks",
    "seeds",
    "defaults",
    "overrides",
    "selection",
    "references",
    "rows",
    "metric",
    "also",
    "questions",
}


@dataclass(frozen=True)
class BenchSpec:
    out: Path
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    defaults: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    selection: str = "last"
    """Which epoch the main table reports: 'last' (no selection on dev) or 'best'."""
    references: tuple[str, ...] = ("lora",)
    """Every other method is compared with each of these, seed by seed (paired)."""
    rows: dict[str, dict[str, Any]] | None = None
    """Named rows: ``{row name: {"method": ..., **TrainConfig fields}}``."""
    metric: str | None = None
    """The tables' metric; None: each task's main metric."""
    also: tuple[str, ...] = ()
    """Further metrics, each with its own table (selection epoch only)."""
    questions: dict[str, tuple[str, str]] | None = None
    """``{question: (method, reference)}``: "does method beat reference?", answered by
    `answer_questions` at the selection epoch and the spec's metric."""

    def run_dir(self, task: str, method: str, seed: int) -> Path:
        return self.out / task.replace(":", "-").replace("/", "_") / method / f"seed{seed}"

    def config(self, task: str, method: str, seed: int) -> TrainConfig:
        """The TrainConfig of one run; ``method`` is a method or a row name."""
        row = dict((self.rows or {}).get(method, {"method": method}))
        return TrainConfig(
            task=task,
            seed=seed,
            **{**self.defaults, **self.overrides.get(task, {}), **row},
        )

    def runs(self) -> Iterable[tuple[str, str, int]]:
        """Seed by seed, so that a partial grid already has every task and method once."""
        for seed in self.seeds:
            for task in self.tasks:
                for method in self.methods:
                    yield task, method, seed


def load_spec(path: str | Path) -> BenchSpec:
    """Parse and validate a bench spec; relative paths are taken from the spec's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"bench spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    for key in ("out", "methods", "tasks", "seeds"):
        if key not in data:
            raise ValueError(f"{path}: missing {key!r}")
    known = {f.name for f in fields(TrainConfig)} - {"method", "task", "seed"}
    defaults = dict(data.get("defaults", {}))
    overrides = {k: dict(v) for k, v in data.get("overrides", {}).items()}
    rows = {k: dict(v) for k, v in data.get("rows", {}).items()}
    for where, values in [("defaults", defaults), *overrides.items()]:
        bad = set(values) - known
        if bad:
            raise ValueError(f"{path}: [{where}] has unknown fields {sorted(bad)}")
    for name, values in rows.items():
        if "method" not in values:
            raise ValueError(f"{path}: [rows.{name}] needs a 'method', e.g. method = \"senslora\"")
        bad = set(values) - known - {"method"}
        if bad:
            raise ValueError(f"{path}: [rows.{name}] has unknown fields {sorted(bad)}")
    if UNTUNED in data["methods"] or UNTUNED in rows:
        raise ValueError(f"{path}: {UNTUNED!r} is the name of the step-0 row; rename that row")
    for key in ("glue_dir",):
        if defaults.get(key):
            defaults[key] = str((path.parent / defaults[key]).resolve())
    spec = BenchSpec(
        out=(path.parent / data["out"]).resolve(),
        methods=tuple(data["methods"]),
        tasks=tuple(data["tasks"]),
        seeds=tuple(int(s) for s in data["seeds"]),
        defaults=defaults,
        overrides=overrides,
        selection=data.get("selection", "last"),
        references=tuple(data.get("references", [m for m in ("lora",) if m in data["methods"]])),
        rows=rows,
        metric=data.get("metric"),
        also=tuple(data.get("also", ())),
        questions={q: tuple(pair) for q, pair in data.get("questions", {}).items()},
    )
    for question, pair in (spec.questions or {}).items():
        if len(pair) != 2 or not all(name in spec.methods for name in pair):
            raise ValueError(
                f"{path}: question {question!r} needs two of the methods {spec.methods} "
                f'(["method", "reference"]), got {list(pair)!r}'
            )
    missing = [r for r in spec.references if r not in spec.methods]
    if missing:
        raise ValueError(f"{path}: references {missing} are not among the methods {spec.methods}")
    if spec.metric is not None and not isinstance(spec.metric, str):
        raise ValueError(
            f'{path}: metric must be a metric\'s name, e.g. "nll", got {spec.metric!r}'
        )
    if not all(isinstance(name, str) for name in spec.also):
        raise ValueError(f"{path}: also must be a list of metric names, got {list(spec.also)!r}")
    if spec.selection not in ("last", "best"):
        raise ValueError(f"selection must be 'last' or 'best', got {spec.selection!r}")
    for task, method, seed in spec.runs():
        spec.config(task, method, seed)  # validates every run before anything starts
    return spec


LOCK = "running.lock"


def claim(run_dir: Path) -> bool:
    """Take ``run_dir`` for this process: create its lock file (holding the pid) atomically.
    False when another live process on this machine holds it; a lock left by a process that
    has died is taken over. Several ``senslora bench`` processes can so share one grid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_holder(run_dir) is not None:
                return False
            lock.unlink(missing_ok=True)  # its process died: take over
            continue
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_bench(spec: BenchSpec, runner: Callable[[TrainConfig, Path], Any]) -> dict[str, int]:
    """Run every unfinished run with ``runner(config, out_dir)``, then aggregate. A run that
    another ``senslora bench`` process is running (see `claim`) is left to it."""
    done = skipped = busy = 0
    for task, method, seed in spec.runs():
        run_dir = spec.run_dir(task, method, seed)
        if (run_dir / "results.json").exists():
            skipped += 1
            continue
        if not claim(run_dir):
            busy += 1
            continue
        try:
            if (run_dir / "results.json").exists():  # finished while we looked
                skipped += 1
                continue
            logger.info("run %s / %s / seed %d", task, method, seed)
            runner(spec.config(task, method, seed), run_dir)
        finally:
            (run_dir / LOCK).unlink(missing_ok=True)
        done += 1
        write_summary(spec)
    write_summary(spec)
    return {"ran": done, "skipped": skipped, "busy": busy}


def bench_status(spec: BenchSpec) -> dict[str, Any]:
    """Where a grid stands: its runs ``finished``, ``running`` (a live process holds the lock:
    ``[task, row, seed, pid]``) and ``to_do``; per task, the median wall seconds of its
    finished runs; and ``estimated_seconds_left``: each unfinished run at its task's median
    (None while a task with runs left has none finished), for one process."""
    finished, running, to_do = 0, [], []
    seconds: dict[str, list[float]] = {}
    for task, method, seed in spec.runs():
        run_dir = spec.run_dir(task, method, seed)
        results = run_dir / "results.json"
        if results.exists():
            finished += 1
            wall = json.loads(results.read_text()).get("wall_seconds")
            if wall is not None:
                seconds.setdefault(task, []).append(float(wall))
            continue
        pid = _lock_holder(run_dir)
        if pid is not None:
            running.append([task, method, seed, pid])
        else:
            to_do.append([task, method, seed])
    medians = {task: statistics.median(values) for task, values in seconds.items()}
    left = [task for task, _, _, _ in running] + [task for task, _, _ in to_do]
    known = all(task in medians for task in left)
    return {
        "total": finished + len(running) + len(to_do),
        "finished": finished,
        "running": running,
        "to_do": to_do,
        "median_wall_seconds": medians,
        "estimated_seconds_left": sum(medians[t] for t in left) if known else None,
    }


def _lock_holder(run_dir: Path) -> int | None:
    """The pid of the live process that holds ``run_dir``'s lock, or None."""
    try:
        pid = int((run_dir / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and _alive(pid) else None


def collect_results(spec: BenchSpec) -> list[dict[str, Any]]:
    """Every finished run's results, each with ``row``: its row name in the spec."""
    results = []
    for task, method, seed in spec.runs():
        path = spec.run_dir(task, method, seed) / "results.json"
        if path.exists():
            results.append({**json.loads(path.read_text()), "row": method})
    return results


def write_summary(spec: BenchSpec) -> dict[str, Any]:
    results = collect_results(spec)
    summaries = {
        sel: aggregate(results, spec.methods, spec.tasks, sel, spec.references, spec.metric)
        for sel in ("last", "best")
    }
    primary = summaries[spec.selection]
    extra = {
        name: aggregate(results, spec.methods, spec.tasks, spec.selection, spec.references, name)
        for name in spec.also
    }
    answers = answer_questions(
        results, spec.questions or {}, spec.tasks, spec.selection, spec.metric
    )
    document = {"main": primary, **summaries, "also": extra}
    if answers:
        document["questions"] = answers
    write_text_atomic(spec.out / "results.json", json.dumps(document, indent=2) + "\n")
    other = "best" if spec.selection == "last" else "last"
    asked = (
        f"## Questions ({spec.selection} epoch)\n\n"
        + render_questions(answers, spec.tasks, primary["lower_is_better"])
        + "\n"
        if answers
        else ""
    )
    text = (
        f"# Results\n\n{asked}## Main table ({spec.selection} epoch)\n\n"
        + render_markdown(primary)
        + "".join(
            f"\n## {name} ({spec.selection} epoch)\n\n" + render_markdown(summary)
            for name, summary in extra.items()
        )
        + f"\n## {other.capitalize()} epoch\n\n"
        + render_markdown(summaries[other])
    )
    write_text_atomic(spec.out / "results.md", text)
    return primary
