"""Dev curves of finished runs: the main dev metric after every evaluation, one panel per task,
one line per run folder, from the committed results.json files (the protocol sweep's evidence).

    .venv/bin/python benchmarks/plot_curves.py RESULTS_DIR [RESULTS_DIR ...] --out PNG [--json J]

Each RESULTS_DIR is a `senslora bench` out folder (``<task>/<method>/seed<k>/results.json``); the
line's label is the folder's name and the run's method and seed. ``--json`` also writes the
curves as a table (what the figure shows, for the docs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curves(folders: list[Path]) -> list[dict]:
    """One entry per finished run: label, task, main metric, [(epoch, value in %)], train losses."""
    curves = []
    for folder in folders:
        for path in sorted(folder.glob("*/*/seed*/results.json")):
            result = json.loads(path.read_text())
            key = result["main_metric"]
            points = [(row["epoch"], 100.0 * row[key]) for row in result["evals"] if key in row]
            curves.append(
                {
                    # the run's row (its folder: "lora-lr1e-3"), not only its method
                    "label": f"{folder.name} {path.parent.parent.name} "
                    f"seed {result['config']['seed']}",
                    "task": result["task"],
                    "metric": key,
                    "points": points,
                    "train_losses": result["train_losses"],
                    "learning_rate": result["config"]["learning_rate"],
                }
            )
    return curves


def plot(curves: list[dict], out: Path) -> None:
    tasks = sorted({c["task"] for c in curves})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for curve in (c for c in curves if c["task"] == task):
            epochs, values = zip(*curve["points"], strict=True) if curve["points"] else ((), ())
            ax.plot(epochs, values, "o-", label=curve["label"])
            ax.set_ylabel(f"dev {curve['metric']} (%)")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    curves = read_curves(args.folders)
    if not curves:
        raise SystemExit(f"no finished run (results.json) under {[str(f) for f in args.folders]}")
    plot(curves, args.out)
    if args.json is not None:
        args.json.write_text(json.dumps(curves, indent=2) + "\n")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
