"""The `senslora` command line: thin typer commands over the library."""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from senslora import __version__

app = typer.Typer(
    help="Sensitivity-LoRA: per-module LoRA ranks from second-order sensitivity, as a peft "
    "LoraConfig.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the rank table
    console = Console(width=140)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError)


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2, without a traceback."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


def tracked(items, description: str):
    """Iterate with a progress bar on stderr."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        yield from progress.track(items, description=description, total=len(items))


@app.callback()
def main() -> None:
    """Measure how sensitive each weight matrix is and give it its own LoRA rank."""


@app.command()
def allocate(
    model: str = typer.Option(
        None,
        help="Hugging Face model id, local folder, or a built-in: 'minilm' (default, the shipped "
        "MiniLM encoder) or 'smollm2' (SmolLM2-135M-Instruct, converted once from its GGUF).",
    ),
    calib: str = typer.Option(
        "wikipedia",
        help="Calibration text: 'wikipedia' (built-in, 107 real articles), 'rotten_tomatoes', a "
        "local .txt/.jsonl/.csv/.tsv/.parquet file, or a Hugging Face dataset NAME[:CONFIG].",
    ),
    out: Path = typer.Option(
        ..., help="Output folder for allocation.json, adapter_config.json and ranks.png."
    ),
    avg_rank: int = typer.Option(4, help="Average LoRA rank per matrix (the uniform-LoRA r)."),
    estimator: str = typer.Option(
        "activation",
        help="activation (GPTQ 2XX^T, forward only) | fisher | hutchinson "
        "(need a causal LM: next-token loss).",
    ),
    scheme: str = typer.Option("sra", help="sra (proportional, eq. 15) | pra (progressive)."),
    targets: str = typer.Option(
        "all-linear", help="all-linear, a comma-separated list of module names, or a regex."
    ),
    budget: str = typer.Option("rank", help="rank (sum of ranks) | parameters (trainable params)."),
    score: str = typer.Option(
        "combined", help="combined | global | local | topk | effective_rank."
    ),
    weighting: str = typer.Option("std", help="Metric weights: std (sigma/mu^2) | equal (0.5/mu)."),
    top_k_fraction: float = typer.Option(0.5, help="k of the Top-k metric as a share of N."),
    effective_rank_threshold: float = typer.Option(0.85, help="alpha of the effective rank."),
    spectrum: str = typer.Option(
        "diagonal",
        help="Effective rank over the Hessian 'diagonal' or the 'eigenvalues' of "
        "2XX^T (activation only; O(d_in^2) memory per module).",
    ),
    min_rank: int = typer.Option(1, help="Smallest rank; 0 lets a matrix go without adapter."),
    max_rank: int = typer.Option(None, help="Largest rank (default: min(d_in, d_out))."),
    lora_alpha: float = typer.Option(
        None,
        help="lora_alpha of uniform LoRA r=avg-rank (default 2 x avg-rank); each module "
        "keeps that alpha/r.",
    ),
    alpha_policy: str = typer.Option(
        "scale", help="scale (alpha/r as for uniform LoRA) | rslora | constant."
    ),
    num_samples: int = typer.Option(128, help="Calibration sequences."),
    seq_len: int = typer.Option(256, help="Max tokens per calibration sequence."),
    batch_size: int = typer.Option(8, help="Calibration batch size."),
    seed: int = typer.Option(0, help="Seed of the calibration sample (and Hutchinson probes)."),
    text_field: str = typer.Option(None, help="Text column/field of a file or hub dataset."),
    num_probes: int = typer.Option(8, help="Hutchinson probes per batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("float32", help="Model dtype: float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace results already in --out."),
) -> None:
    """Calibrate, score every weight matrix and write a per-module LoRA allocation.

    With no --model/--calib it runs on the built-in default: the shipped MiniLM encoder and the
    Wikipedia sample. Example: senslora allocate --model HuggingFaceTB/SmolLM2-135M
    --calib wikitext:wikitext-2-raw-v1 --avg-rank 8 --out runs/smollm2
    """
    try:
        _allocate(**locals())
    except USER_ERRORS as error:
        fail(str(error))
    except FloatingPointError as error:
        fail(str(error))


def _allocate(**options) -> None:
    import peft

    from senslora import AllocationConfig, allocate_ranks, collect_statistics
    from senslora.data import CalibrationConfig, calibration_batches, count_tokens, describe_source
    from senslora.models import load_model, load_tokenizer, resolve_model_path
    from senslora.peft_bridge import lora_alphas
    from senslora.report import rank_table

    out: Path = options["out"]
    if (out / "allocation.json").exists() and not options["overwrite"]:
        raise ValueError(f"{out} already holds an allocation.json; pass --overwrite to replace it")
    model_path = resolve_model_path(options["model"])
    config = AllocationConfig(
        avg_rank=options["avg_rank"],
        budget=options["budget"],
        scheme=options["scheme"],
        score=options["score"],
        min_rank=options["min_rank"],
        max_rank=options["max_rank"],
        weighting=options["weighting"],
        top_k_fraction=options["top_k_fraction"],
        effective_rank_threshold=options["effective_rank_threshold"],
        spectrum=options["spectrum"],
    )
    calibration = CalibrationConfig(
        source=options["calib"],
        num_samples=options["num_samples"],
        seq_len=options["seq_len"],
        batch_size=options["batch_size"],
        seed=options["seed"],
        text_field=options["text_field"],
    )
    targets = options["targets"]
    if "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]

    console.print(f"model [bold]{model_path}[/], calibration [bold]{calibration.source}[/]")
    model = load_model(model_path, device=options["device"], dtype=options["dtype"])
    batches = calibration_batches(load_tokenizer(model_path), calibration)
    start = time.perf_counter()
    stats = collect_statistics(
        model,
        tracked(batches, f"calibrating ({options['estimator']})"),
        estimator=options["estimator"],
        targets=targets,
        num_probes=options["num_probes"],
        seed=options["seed"],
        keep_gram=config.spectrum == "eigenvalues",
    )
    seconds = time.perf_counter() - start
    provenance = {
        "model": model_path,
        "model_class": type(model).__name__,
        "calibration": describe_source(calibration.source, split=calibration.split),
        "calibration_config": dataclasses.asdict(calibration),
        "num_sequences": sum(len(b["input_ids"]) for b in batches),
        "num_tokens": count_tokens(batches),
        "estimator": options["estimator"],
        "targets": options["targets"],
        "senslora_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "calibration_seconds": round(seconds, 3),
    }
    allocation = allocate_ranks(stats, config, provenance=provenance)
    variants = {
        score: allocate_ranks(stats, dataclasses.replace(config, score=score))
        for score in ("global", "topk", "effective_rank")
    }
    variants["combined"] = allocation

    alpha = options["lora_alpha"] or 2.0 * config.avg_rank
    base = peft.LoraConfig(r=config.avg_rank, lora_alpha=alpha)
    policy = options["alpha_policy"]
    lora_config = allocation.to_lora_config(base, alpha_policy=policy)
    alphas = lora_alphas(allocation.ranks, base, policy)
    _write_outputs(out, allocation, lora_config, alphas, variants)

    console.print(rank_table(allocation))
    console.print(
        f"calibration + metrics on {provenance['num_tokens']:,} tokens "
        f"({provenance['num_sequences']} sequences): {seconds:.1f} s"
    )
    console.print(
        f"wrote {out / 'allocation.json'}, {out / 'adapter_config.json'}, {out / 'ranks.png'}"
    )


def _write_outputs(out: Path, allocation, lora_config, alphas, variants) -> None:
    """Every file is written to a temporary name first and renamed when complete."""
    from senslora.report import plot_ranks

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        lora_config.save_pretrained(tmp)
        allocation.save(str(Path(tmp) / "allocation.json"), alphas=alphas)
        plot_ranks(variants, Path(tmp) / "ranks.png")
        for name in ("adapter_config.json", "allocation.json", "ranks.png"):
            shutil.move(str(Path(tmp) / name), out / name)


if __name__ == "__main__":  # pragma: no cover
    app()
