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

Each run lives in ``out/<task>/<method>/seed<k>/results.json``; a run with that file is finished
and never re-run, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import statistics
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from senslora.files import write_text_atomic
from senslora.finetune.config import TrainConfig
from senslora.finetune.paired import holm, paired_summary

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

    def run_dir(self, task: str, method: str, seed: int) -> Path:
        return self.out / task.replace(":", "-").replace("/", "_") / method / f"seed{seed}"

    def config(self, task: str, method: str, seed: int) -> TrainConfig:
        return TrainConfig(
            method=method, task=task, seed=seed, **{**self.defaults, **self.overrides.get(task, {})}
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
    for where, values in [("defaults", defaults), *overrides.items()]:
        bad = set(values) - known
        if bad:
            raise ValueError(f"{path}: [{where}] has unknown fields {sorted(bad)}")
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
    )
    missing = [r for r in spec.references if r not in spec.methods]
    if missing:
        raise ValueError(f"{path}: references {missing} are not among the methods {spec.methods}")
    if spec.selection not in ("last", "best"):
        raise ValueError(f"selection must be 'last' or 'best', got {spec.selection!r}")
    for task, method, seed in spec.runs():
        spec.config(task, method, seed)  # validates every run before anything starts
    return spec


def run_bench(spec: BenchSpec, runner: Callable[[TrainConfig, Path], Any]) -> dict[str, int]:
    """Run every unfinished run with ``runner(config, out_dir)``, then aggregate."""
    done = skipped = 0
    for task, method, seed in spec.runs():
        run_dir = spec.run_dir(task, method, seed)
        if (run_dir / "results.json").exists():
            skipped += 1
            continue
        logger.info("run %s / %s / seed %d", task, method, seed)
        runner(spec.config(task, method, seed), run_dir)
        done += 1
        write_summary(spec)
    write_summary(spec)
    return {"ran": done, "skipped": skipped}


def collect_results(spec: BenchSpec) -> list[dict[str, Any]]:
    results = []
    for task, method, seed in spec.runs():
        path = spec.run_dir(task, method, seed) / "results.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results


def score(result: dict[str, Any], selection: str) -> float:
    """The main dev metric of a run, in percent, at its last or best epoch."""
    row = result[selection]
    return 100.0 * float(row[result["main_metric"]])


def adapter_parameters(result: dict[str, Any]) -> int:
    """Trainable adapter parameters of a run: the LoRA factors, plus the hypernetwork that
    generates them for hyperadalora (the classification head, the same for all, excluded)."""
    parameters = result["parameters"]
    return int(parameters["lora"]) + int(parameters.get("hypernetwork", 0))


def aggregate(
    results: list[dict[str, Any]], methods, tasks, selection="last", references=("lora",)
) -> dict[str, Any]:
    """Mean ± std over seeds per method and task, the average over tasks, and each method's
    paired (same seed) difference to each reference: mean, 95% interval, paired t-test p (and
    Holm-corrected over the tasks), seeds won (`senslora.finetune.paired`)."""
    by = {(r["method"], r["task"], r["config"]["seed"]): r for r in results}
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        row: dict[str, Any] = {}
        for task in tasks:
            runs = [r for (m, t, _), r in by.items() if m == method and t == task]
            row[task] = _summary([score(r, selection) for r in runs])
            counts = sorted(adapter_parameters(r) for r in runs)
            row[task]["params"] = adapter_parameters(runs[0]) if runs else None
            # the allocation, hence the count, may differ with the seed's calibration sample
            row[task]["params_range"] = [counts[0], counts[-1]] if runs else None
        for reference in references:
            if method != reference:
                _compare(row, by, method, reference, tasks, selection)
        complete = [row[t]["mean"] for t in tasks if row[t]["n"]]
        row["average"] = {
            "mean": statistics.fmean(complete) if len(complete) == len(tasks) else None,
            "tasks": len(complete),
        }
        table[method] = row
    return {
        "selection": selection,
        "methods": list(methods),
        "tasks": list(tasks),
        "references": list(references),
        "table": table,
    }


def _compare(row: dict, by: dict, method: str, reference: str, tasks, selection: str) -> None:
    """``row[task]["diff_vs_<reference>"]`` for every task, Holm-corrected over the tasks."""
    key = f"diff_vs_{reference}"
    for task in tasks:
        diffs = [
            score(r, selection) - score(by[(reference, task, s)], selection)
            for (m, t, s), r in sorted(by.items(), key=lambda item: item[0][2])
            if m == method and t == task and (reference, task, s) in by
        ]
        row[task][key] = paired_summary(diffs)
    adjusted = holm({task: row[task][key]["p"] for task in tasks})
    for task in tasks:
        row[task][key]["p_holm"] = adjusted[task]


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": statistics.fmean(values), "std": std}


def render_markdown(summary: dict[str, Any]) -> str:
    tasks, table = summary["tasks"], summary["table"]
    head = "| method | " + " | ".join(tasks) + " | Avg. | adapter params |"
    lines = [
        f"Dev metric ({summary['selection']} epoch), mean ± std over seeds (n = seeds).",
        "",
        head,
        "|" + "---|" * (len(tasks) + 3),
    ]
    for method, row in table.items():
        cells = [_cell(row[t]) for t in tasks]
        average = row["average"]["mean"]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {'-' if average is None else f'{average:.2f}'} | "
            + _params_cell([row[t].get("params_range") for t in tasks])
            + " |"
        )
    for reference in summary.get("references", ["lora"]):
        lines += _paired_lines(summary, reference)
    return "\n".join(lines) + "\n"


def _paired_lines(summary: dict[str, Any], reference: str) -> list[str]:
    tasks, table = summary["tasks"], summary["table"]
    lines = [
        "",
        f"Paired difference to `{reference}` (same seed): mean [95% interval], paired t-test p "
        "Holm-corrected over the tasks, seeds won / n:",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for method, row in table.items():
        if method != reference:
            cells = [_paired_cell(row[t].get(f"diff_vs_{reference}", {"n": 0})) for t in tasks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _paired_cell(stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return "-"
    text = f"{stats['mean']:+.2f}"
    if stats.get("ci95") is not None:
        low, high = stats["ci95"]
        text += f" [{low:+.2f}, {high:+.2f}]"
    if stats.get("p_holm") is not None:
        text += f", p {stats['p_holm']:.3f}"
    return text + f", {stats['wins']}/{stats['n']}"


def _params_cell(ranges: list[list[int] | None]) -> str:
    """Adapter parameters over every task and seed: one count, or the smallest–largest."""
    counts = [count for r in ranges if r for count in r]
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _cell(stats: dict[str, Any], signed: bool = False) -> str:
    if not stats.get("n"):
        return "-"
    sign = "+" if signed else ""
    return f"{stats['mean']:{sign}.2f} ± {stats['std']:.2f} ({stats['n']})"


def write_summary(spec: BenchSpec) -> dict[str, Any]:
    results = collect_results(spec)
    summaries = {
        sel: aggregate(results, spec.methods, spec.tasks, sel, spec.references)
        for sel in ("last", "best")
    }
    primary = summaries[spec.selection]
    write_text_atomic(
        spec.out / "results.json", json.dumps({"main": primary, **summaries}, indent=2) + "\n"
    )
    other = "best" if spec.selection == "last" else "last"
    text = (
        f"# Results\n\n## Main table ({spec.selection} epoch)\n\n"
        + render_markdown(primary)
        + f"\n## {other.capitalize()} epoch\n\n"
        + render_markdown(summaries[other])
    )
    write_text_atomic(spec.out / "results.md", text)
    return primary
