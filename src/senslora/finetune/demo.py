"""`senslora demo`: the whole pipeline on the built-in default, end to end, on a CPU.

Uniform LoRA, Sensitivity-LoRA (its default statistics: the Fisher of the task's labelled examples)
and its control, the size prior (ranks from the matrix shapes alone), all at most uniform LoRA's
parameter count (the paper's A.2), fine-tuned on the built-in rotten_tomatoes task (a fixed
training subset), evaluated on its fixed dev split, compared in a table, with the rank plot and a
short report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.table import Table

from senslora.files import write_text_atomic
from senslora.finetune.config import TrainConfig
from senslora.report import plot_ranks, rank_table
from senslora.serialization import load_allocation

FULL = TrainConfig(
    task="rotten_tomatoes",
    model="minilm",
    avg_rank=4,
    epochs=2,
    batch_size=32,
    max_length=64,
    train_limit=4000,
    dev_limit=1000,
    calib="wikipedia",
    calib_samples=128,
)
QUICK = dataclasses.replace(
    FULL, epochs=1, train_limit=64, dev_limit=64, calib_samples=16, calib_seq_len=64, batch_size=16
)
METHODS = ("lora", "senslora", "size-prior")


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    verbose: bool = False,
) -> dict[str, dict]:
    from senslora.finetune.training import run_training

    console = console or Console()
    out = Path(out)
    base = QUICK if quick else FULL
    results = {}
    for method in METHODS:
        run_dir = out / method
        if (run_dir / "results.json").exists() and not overwrite:
            import json

            results[method] = json.loads((run_dir / "results.json").read_text())
            console.print(f"{method}: finished earlier, reusing {run_dir / 'results.json'}")
            continue
        console.print(
            f"[bold]{method}[/]: fine-tuning MiniLM on rotten_tomatoes "
            f"({base.train_limit} examples, {base.epochs} epochs)"
        )
        results[method] = run_training(
            dataclasses.replace(base, method=method), run_dir, overwrite=overwrite, verbose=verbose
        )
    allocation = load_allocation(out / "senslora" / "allocation.json")
    console.print(rank_table(allocation, title=f"Sensitivity-LoRA ranks ({_source(allocation)})"))
    plot_ranks({"combined": allocation}, out / "ranks.png")
    table, report = comparison(results)
    console.print(table)
    write_text_atomic(out / "report.md", report)
    console.print(f"wrote {out / 'report.md'} and {out / 'ranks.png'}")
    return results


def comparison(results: dict[str, dict]) -> tuple[Table, str]:
    """A rich table and a markdown report of the runs, side by side."""
    table = Table(
        title="lora, senslora and the size prior on rotten_tomatoes at an equal parameter count "
        "(dev accuracy, %)"
    )
    columns = ("method", "last epoch", "best epoch", "LoRA params", "train s", "peak MB")
    for column in columns:
        table.add_column(column, justify="right")
    lines = ["# senslora demo", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for method, r in results.items():
        key = r["main_metric"]
        row = (
            method,
            f"{100 * r['last'][key]:.2f}",
            f"{100 * r['best'][key]:.2f}",
            f"{r['parameters']['lora']:,}",
            f"{r['train_seconds']:.0f}",
            f"{r['peak_memory_mb']:.0f}",
        )
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    first = next(iter(results.values()))
    lines += [
        "",
        f"Task {first['task']}: {first['num_train']} training examples, "
        f"dev {_sizes(first['num_dev'])}, {first['config']['epochs']} epochs, average rank "
        f"{first['config']['avg_rank']} (every method at most uniform LoRA's parameter count), "
        f"seed {first['config']['seed']}. One seed: a "
        "difference below about one point is within seed noise (see docs/results.md).",
        "",
        "![ranks](ranks.png)",
    ]
    return table, "\n".join(lines) + "\n"


def _source(allocation) -> str:
    """What the allocation measured: its estimator and calibration, from its provenance."""
    provenance = allocation.provenance
    return f"{provenance.get('estimator', '?')} on {provenance.get('calibration', '?')}"


def _sizes(num_dev: dict[str, int]) -> str:
    """``{'dev': 1000}`` -> ``1,000 examples``; several dev splits are named."""
    if len(num_dev) == 1:
        return f"{next(iter(num_dev.values())):,} examples"
    return ", ".join(f"{name} {count:,}" for name, count in num_dev.items())
