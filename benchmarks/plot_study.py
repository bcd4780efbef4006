"""The paired differences of a bench grid, seed by seed: what the questions' tests see.

    .venv/bin/python benchmarks/plot_study.py benchmarks/glue_minilm_equal_params.toml \
        --out docs/img/equal-params.png --json benchmarks/results/equal_params_differences.json

One panel per task plus the task average. Each row is a method of the grid against the
reference (default: the first of the spec's references): one dot per seed (method − reference,
same seed), the mean as a bar and its 95% t-interval as a line. ``--json`` writes the plotted
differences, seed by seed, beside the figure (what the docs cite). Rows listed with ``--leave-out``
(default: ``frozen``, many points below every other row) are not drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from senslora.finetune.grid import collect_results, load_spec  # noqa: E402
from senslora.finetune.paired import paired_summary  # noqa: E402
from senslora.finetune.tables import (  # noqa: E402
    average_differences,
    by_run,
    seed_differences,
)

AVERAGE = "average"


def differences(spec_path: Path, reference: str | None = None, leave_out=("frozen",)) -> dict:
    """``{"reference", "tasks", "rows": {row: {task or "average": {seed: difference}}}}``, in
    points (percent), at the spec's selection epoch and metric; the average over the tasks only
    for seeds with every task on both sides (`tables.average_differences`, what the questions
    test)."""
    spec = load_spec(spec_path)
    reference = reference or spec.references[0]
    by = by_run(collect_results(spec))
    rows: dict[str, dict[str, dict[int, float]]] = {}
    for row in spec.methods:
        if row == reference or row in leave_out:
            continue
        rows[row] = {
            task: seed_differences(by, row, reference, task, spec.selection, spec.metric)
            for task in spec.tasks
        }
        rows[row][AVERAGE] = average_differences(
            by, row, reference, spec.tasks, spec.selection, spec.metric
        )
    return {
        "spec": str(spec_path),
        "reference": reference,
        "selection": spec.selection,
        "tasks": [*spec.tasks, AVERAGE],
        "rows": rows,
    }


def plot(data: dict, out: Path) -> None:
    tasks, rows = data["tasks"], list(data["rows"])
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(3.2 * len(tasks), 0.55 * len(rows) + 1.6), sharey=True
    )
    for ax, task in zip(axes, tasks, strict=True):
        for y, row in enumerate(rows):
            values = list(data["rows"][row][task].values())
            if not values:
                continue
            ax.plot(values, [y] * len(values), "o", color="tab:blue", alpha=0.55, ms=5)
            summary = paired_summary(values)
            ax.plot([summary["mean"]] * 2, [y - 0.3, y + 0.3], color="black", lw=2)
            if summary["ci95"] is not None:
                ax.plot(summary["ci95"], [y, y], color="black", lw=1)
        ax.axvline(0.0, color="tab:gray", lw=0.8, ls="--")
        ax.set_title("mean over the tasks" if task == AVERAGE else task, fontsize=10)
        ax.set_xlabel(f"− {data['reference']} (points)")
        ax.set_yticks(range(len(rows)), rows)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"paired difference to {data['reference']} per seed (dots), mean and 95% interval",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="the bench spec (TOML) of the grid")
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    parser.add_argument("--json", type=Path, help="write the plotted differences here")
    parser.add_argument("--reference", help="the row to subtract (default: the spec's first)")
    parser.add_argument("--leave-out", nargs="*", default=["frozen"], help="rows not drawn")
    args = parser.parse_args()
    data = differences(args.spec, args.reference, tuple(args.leave_out))
    plot(data, args.out)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
