"""Convergence of AdaLoRA vs HyperAdaLoRA (and LoRA, for reference) from a finished bench grid.

    .venv/bin/python benchmarks/convergence.py benchmarks/results/glue-minilm

Reads ``<grid>/<task>/<method>/seed<k>/results.json`` of runs trained with ``eval_steps`` (an
evaluation every N optimizer steps, see benchmarks/glue_minilm_gpu.toml) and writes:

- ``results/convergence.json``: per task and method, the mean dev curve over seeds, the final
  scores, the steps each run needs to reach 95% of AdaLoRA's final score (same seed) and of
  LoRA's final score (same seed), the device of each run and the peak training memory per process
  (per device: the GPU's allocated peak and the CPU's resident peak are not comparable);
- ``docs/img/convergence.png``: dev metric against optimizer step, one panel per task.

A run that never reaches the threshold gets ``null`` steps. Scores are in percent; for CoLA
(Matthews correlation, which can be 0 or negative) 95% of a non-positive final score is taken
as that score itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("adalora", "hyperadalora", "lora")
STYLE = {"adalora": "tab:red", "hyperadalora": "tab:blue", "lora": "tab:gray"}


def load_runs(grid: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """task -> method -> seed -> results.json, for the methods of interest."""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(grid.glob("*/*/seed*/results.json")):
        result = json.loads(path.read_text())
        if result["method"] not in METHODS:
            continue
        seed = int(result["config"]["seed"])
        runs.setdefault(result["task"], {}).setdefault(result["method"], {})[seed] = result
    return runs


def curve(result: dict) -> list[tuple[int, float]]:
    """(step, main dev metric in percent) of every evaluation of a run."""
    key = result["main_metric"]
    return [(int(e["step"]), 100.0 * float(e[key])) for e in result["evals"]]


def threshold(final: float, fraction: float = 0.95) -> float:
    return fraction * final if final > 0 else final


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluation step whose score reaches ``target``."""
    return next((step for step, value in points if value >= target), None)


def summarize_task(by_method: dict[str, dict[int, dict]]) -> dict:
    out: dict[str, dict] = {}
    seeds = sorted(set.intersection(*(set(s) for s in by_method.values())))
    finals = {m: {s: curve(by_method[m][s])[-1][1] for s in seeds} for m in by_method}
    for method, runs in by_method.items():
        curves = {s: curve(runs[s]) for s in seeds}
        steps = [step for step, _ in curves[seeds[0]]]
        mean_curve = [
            (step, statistics.fmean(curves[s][i][1] for s in seeds))
            for i, step in enumerate(steps)
            if all(len(curves[s]) > i for s in seeds)
        ]
        entry = {
            "seeds": seeds,
            "total_steps": steps[-1],
            "final": _stats([finals[method][s] for s in seeds]),
            "best": _stats([max(v for _, v in curves[s]) for s in seeds]),
            "mean_curve": mean_curve,
            "devices": {s: runs[s]["device"] for s in seeds},
            "peak_memory_mb": {  # per device: CUDA and CPU peaks measure different things
                device: _stats(
                    [float(runs[s]["peak_memory_mb"]) for s in seeds if runs[s]["device"] == device]
                )
                for device in sorted({runs[s]["device"] for s in seeds})
            },
            "trainable_parameters": runs[seeds[0]]["parameters"]["trainable"],
        }
        for reference in ("adalora", "lora"):
            if reference in finals:
                reached = [steps_to(curves[s], threshold(finals[reference][s])) for s in seeds]
                entry[f"steps_to_95pct_of_{reference}_final"] = reached
        out[method] = entry
    return out


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def plot(summary: dict, path: Path) -> None:
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method, entry in summary[task].items():
            steps, values = zip(*entry["mean_curve"], strict=True)
            ax.plot(
                steps,
                values,
                label=method,
                color=STYLE[method],
                linestyle="--" if method == "lora" else "-",
                marker="o",
                markersize=2.5,
            )
        ax.set_title(f"{task} (mean of {len(entry['seeds'])} seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("dev metric (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="a bench output folder")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "convergence.json")
    parser.add_argument(
        "--plot", type=Path, default=HERE.parent / "docs" / "img" / "convergence.png"
    )
    args = parser.parse_args()
    runs = load_runs(args.grid)
    if not runs:
        parser.error(f"no results.json of {METHODS} under {args.grid}")
    order = ["glue:rte", "glue:mrpc", "glue:sst2", "glue:cola"]
    tasks = sorted(runs, key=lambda t: order.index(t) if t in order else len(order))
    summary = {task: summarize_task(runs[task]) for task in tasks}
    args.out.write_text(json.dumps({"grid": str(args.grid), "tasks": summary}, indent=2) + "\n")
    plot(summary, args.plot)
    for task, methods in summary.items():
        for method, entry in methods.items():
            print(
                f"{task:10s} {method:13s} final {entry['final']['mean']:6.2f} "
                f"± {entry['final']['std']:.2f}  steps to 95% of adalora "
                f"{entry.get('steps_to_95pct_of_adalora_final')}  of lora "
                f"{entry.get('steps_to_95pct_of_lora_final')}  / {entry['total_steps']}"
            )
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
