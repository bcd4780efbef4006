"""Dev curves of finished runs: the main dev metric after every evaluation, one panel per task,
one line per run folder, from the committed results.json files (the protocol sweep's evidence).

    .venv/bin/python benchmarks/plot_curves.py RESULTS_DIR [RESULTS_DIR ...] --out PNG [--json J]
        [--mean]

Each RESULTS_DIR is a `senslora bench` out folder (``<task>/<method>/seed<k>/results.json``); the
line's label is the run's row and seed, after the folder's name where there are several folders.
``--json`` also writes the curves as a table (what the figure shows, for the docs). ``--mean``
draws one line per row: the mean over its seeds at each epoch (the seeds listed in the label),
for a grid with many seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_curves(folders: list[Path]) -> list[dict]:
    """One entry per finished run: label, task, main metric, [(epoch, value in %)], train losses."""
    curves = []
    for folder in folders:
        for path in sorted(folder.glob("*/*/seed*/results.json")):
            result = json.loads(path.read_text())
            key = result["main_metric"]
            points = [(row["epoch"], 100.0 * row[key]) for row in result["evals"] if key in row]
            # the run's row (its folder: "lora-lr1e-3"), not only its method; the bench folder
            # too where several are drawn together
            row = path.parent.parent.name
            name = f"{folder.name} {row}" if len(folders) > 1 else row
            seed = result["config"]["seed"]
            curves.append(
                {
                    "label": f"{name} seed {seed}",
                    "name": name,
                    "seed": seed,
                    "task": result["task"],
                    "metric": key,
                    "points": points,
                    "train_losses": result["train_losses"],
                    "learning_rate": result["config"]["learning_rate"],
                }
            )
    return curves


def mean_curves(curves: list[dict]) -> list[dict]:
    """One curve per (folder, row, task): the mean over the seeds at each epoch that every seed
    reached."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for curve in curves:
        groups.setdefault((curve["name"], curve["task"]), []).append(curve)
    means = []
    for (name, task), members in groups.items():
        epochs = sorted(set.intersection(*({e for e, _ in c["points"]} for c in members)))
        points = [
            (epoch, sum(dict(c["points"])[epoch] for c in members) / len(members))
            for epoch in epochs
        ]
        seeds = ", ".join(str(c["seed"]) for c in members)
        means.append(
            {
                "label": f"{name} (mean of seeds {seeds})",
                "name": name,
                "task": task,
                "metric": members[0]["metric"],
                "points": points,
                "seeds": len(members),
            }
        )
    return means


def plot(curves: list[dict], out: Path) -> None:
    """One panel per task. Up to 4 lines a panel keep their own legends; more share one legend
    below the panels, one colour per line name across the panels (the seeds of a mean are then
    in the JSON, not the legend)."""
    tasks = sorted({c["task"] for c in curves})
    names = list(dict.fromkeys(c["name"] for c in curves))
    shared = max(sum(c["task"] == t for c in curves) for t in tasks) > 4
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for curve in (c for c in curves if c["task"] == task):
            name = curve["name"]
            epochs, values = zip(*curve["points"], strict=True) if curve["points"] else ((), ())
            label = name if shared else curve["label"]
            ax.plot(epochs, values, "o-", label=label, color=colours[name] if shared else None)
            ax.set_ylabel(f"dev {curve['metric']} (%)")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not shared:
            ax.legend(fontsize=7)
    if shared:
        handles = [plt.Line2D([], [], color=colours[n], marker="o") for n in names]
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8)
        fig.tight_layout(rect=(0, 0.08 * ((len(names) + 3) // 4), 1, 1))
    else:
        fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--mean", action="store_true", help="one line per row: the seeds' mean")
    args = parser.parse_args()
    curves = read_curves(args.folders)
    if not curves:
        raise SystemExit(f"no finished run (results.json) under {[str(f) for f in args.folders]}")
    if args.mean:
        curves = mean_curves(curves)
    plot(curves, args.out)
    if args.json is not None:
        args.json.write_text(json.dumps(curves, indent=2) + "\n")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
