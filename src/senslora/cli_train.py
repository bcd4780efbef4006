"""`senslora train`, `senslora bench` and `senslora demo`: thin commands over training/bench."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from senslora.cli import USER_ERRORS, app, console, fail
from senslora.config import METHODS, TrainConfig


def _train_config(**options) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in options.items() if k in known and v is not None})


@app.command()
def train(
    method: str = typer.Option("senslora", help=" | ".join(METHODS)),
    task: str = typer.Option(
        "glue:rte",
        help="glue:<cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli>, rotten_tomatoes, "
        "csv:PATH, jsonl:PATH, gen:PATH or wikipedia_lead.",
    ),
    glue_dir: str = typer.Option(None, help="Folder in the glue_data layout (else the hub)."),
    model: str = typer.Option(None, help="Model id, folder, or minilm (default) / smollm2."),
    avg_rank: int = typer.Option(4, help="Average rank per matrix, the same for every method."),
    lora_alpha: float = typer.Option(None, help="alpha of uniform LoRA (default 2 x avg-rank)."),
    epochs: int = typer.Option(3, help="Training epochs (the paper uses 10)."),
    batch_size: int = typer.Option(32),
    learning_rate: float = typer.Option(5e-4),
    max_length: int = typer.Option(128, help="Max tokens per example (dynamic padding)."),
    train_limit: int = typer.Option(None, help="Fixed subset of the training set."),
    dev_limit: int = typer.Option(None, help="Fixed subset of the dev set."),
    calib: str = typer.Option(
        "wikipedia", help="Calibration text for senslora ('task': the task's own training texts)."
    ),
    calib_samples: int = typer.Option(128, help="Calibration sequences (senslora methods)."),
    calib_seq_len: int = typer.Option(128, help="Max tokens per calibration sequence."),
    max_rank: int = typer.Option(None, help="senslora: cap on the rank of any one matrix."),
    budget: str = typer.Option(
        "rank", help="senslora: rank (LoRA's total rank) | parameters (LoRA's parameter count)."
    ),
    eval_steps: int = typer.Option(
        0, help="Evaluate every N optimizer steps (0: every epoch); all go to results.json."
    ),
    hyperadalora_init: str = typer.Option(
        "uniform", help="hyperadalora's initial ranks: uniform | senslora (from sensitivity)."
    ),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    out: Path = typer.Option(..., help="Run folder: results.json, adapter/, allocation.json."),
    overwrite: bool = typer.Option(False, help="Redo a finished run."),
) -> None:
    """Fine-tune one method on one task and evaluate every epoch (or every --eval-steps)."""
    from senslora.bench import adapter_parameters
    from senslora.training import run_training

    try:
        config = _train_config(**locals())
        results = run_training(config, out, overwrite=overwrite)
    except USER_ERRORS as error:
        fail(str(error))
    main = results["main_metric"]
    console.print(
        f"{results['method']} on {results['task']}: {main} last {100 * results['last'][main]:.2f}"
        f", best {100 * results['best'][main]:.2f} (epoch {results['best']['epoch']:g}); "
        f"{adapter_parameters(results):,} adapter parameters; {results['train_seconds']:.0f} s"
    )


@app.command()
def bench(
    spec: Path = typer.Argument(..., help="TOML spec: methods x tasks x seeds (see docs)."),
    only_summary: bool = typer.Option(False, help="Aggregate finished runs, run nothing."),
) -> None:
    """Run a methods x tasks x seeds grid (resumable) and write results.md / results.json."""
    from senslora.bench import load_spec, run_bench, write_summary
    from senslora.training import run_training

    try:
        bench_spec = load_spec(spec)
        if only_summary:
            write_summary(bench_spec)
        else:
            counts = run_bench(bench_spec, lambda config, out: run_training(config, out))
            console.print(f"ran {counts['ran']} runs, {counts['skipped']} already finished")
    except USER_ERRORS as error:
        fail(str(error))
    console.print((bench_spec.out / "results.md").read_text())


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    quick: bool = typer.Option(False, help="A tiny version for smoke tests (seconds)."),
    overwrite: bool = typer.Option(False, help="Redo finished runs."),
) -> None:
    """The main job: allocate on the Wikipedia sample, fine-tune lora and senslora with the same
    budget on rotten_tomatoes with the shipped MiniLM, and compare."""
    from senslora.demo import run_demo

    try:
        run_demo(out, quick=quick, overwrite=overwrite, console=console)
    except USER_ERRORS as error:
        fail(str(error))
