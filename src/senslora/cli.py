"""The `senslora` command line: thin typer commands over the library."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from senslora import config as allocation_config
from senslora.config import SCORES
from senslora.estimators import DEFAULT_ESTIMATOR
from senslora.finetune.config import TrainConfig, default_of, help_of

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
USER_ERRORS = (OSError, ValueError, ImportError)  # OSError: missing files, full disks, ...
OUTPUT_NAMES = ("adapter_config.json", "allocation.json", "ranks.png")


def _allocation_option(name: str, help: str):
    """A `senslora allocate` option whose default is AllocationConfig's (declared there once)."""
    return typer.Option(allocation_config.default_of(name), help=help)


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
        help="Calibration text: 'wikipedia' (built-in, 106 real articles), 'rotten_tomatoes', a "
        "local .txt/.jsonl/.csv/.tsv/.parquet file, or a Hugging Face dataset NAME[:CONFIG].",
    ),
    out: Path = typer.Option(
        ..., help="Output folder for allocation.json, adapter_config.json and ranks.png."
    ),
    avg_rank: int = _allocation_option(
        "avg_rank", help="Average LoRA rank per matrix (the uniform-LoRA r)."
    ),
    estimator: str = typer.Option(
        DEFAULT_ESTIMATOR,
        help="auto (fisher for a causal LM: its activation statistics follow the attention sink, "
        "docs/method.md; activation otherwise, or where the Fisher's memory, 6-8 bytes per adapted "
        "weight, is not free) | activation (GPTQ 2XX^T, forward only) | fisher | "
        "hutchinson (fisher/hutchinson need a causal LM: next-token loss).",
    ),
    scheme: str = _allocation_option(
        "scheme", help="sra (proportional, eq. 15) | pra (progressive)."
    ),
    targets: str = typer.Option(
        "all-linear", help="all-linear, a comma-separated list of module names, or a regex."
    ),
    budget: str = _allocation_option(
        "budget",
        help="parameters (at most uniform LoRA r's trainable parameters: the paper's rule for "
        "comparing methods, A.2; the default) | rank (the ranks sum to uniform LoRA's; the "
        "default of --scheme pra).",
    ),
    score: str = _allocation_option("score", help=" | ".join(SCORES) + "."),
    weighting: str = _allocation_option(
        "weighting", help="Metric weights: std (sigma/mu^2) | equal (0.5/mu)."
    ),
    top_k_fraction: float = _allocation_option(
        "top_k_fraction", help="k of the Top-k metric as a share of N."
    ),
    effective_rank_threshold: float = _allocation_option(
        "effective_rank_threshold", help="alpha of the effective rank."
    ),
    spectrum: str = _allocation_option(
        "spectrum",
        help="Effective rank over the Hessian 'diagonal' or the 'eigenvalues' of "
        "2XX^T (activation only; O(d_in^2) memory per module).",
    ),
    curvature: str = _allocation_option(
        "curvature",
        help="What the metrics read per weight: hessian (the diagonal h_qq, eqs. 6-10) | inverse "
        "(1/[(H + lambda I)^-1]_qq, Section 4.6; activation only; O(d_in^2) memory per module).",
    ),
    skip_positions: int = typer.Option(
        0,
        help="activation: leave the first N real tokens of every sequence out of the statistics "
        "(attention sinks, e.g. SmolLM2's first token; docs/method.md).",
    ),
    outlier_factor: float = typer.Option(
        None,
        help="activation: leave out tokens whose layer-input norm exceeds this many times the "
        "batch median (massive activations; 10 is the documented choice).",
    ),
    min_rank: int = _allocation_option(
        "min_rank", help="Smallest rank; 0 lets a matrix go without adapter."
    ),
    max_rank: int = _allocation_option(
        "max_rank", help="Largest rank (default: min(d_in, d_out))."
    ),
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
    device_map: str = typer.Option(
        None,
        help="Spread a model that does not fit one device over GPUs and CPU memory (accelerate): "
        "auto | balanced | sequential. Offloaded layers: activation estimator only.",
    ),
    dtype: str = typer.Option("float32", help="Model dtype: float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace results already in --out."),
) -> None:
    """Calibrate, score every weight matrix and write a per-module LoRA allocation.

    With no --model/--calib it runs on the built-in default: the shipped MiniLM encoder and the
    Wikipedia sample. Example: senslora allocate --model HuggingFaceTB/SmolLM2-135M
    --calib wikitext:wikitext-2-raw-v1 --avg-rank 8 --out runs/smollm2

    Under torchrun or accelerate launch each process calibrates on its share of the batches and
    the statistics are summed; rank 0 alone prints and writes (docs/distributed.md).
    """
    from senslora import AllocationConfig
    from senslora.config import check_choice
    from senslora.data import CalibrationConfig
    from senslora.distributed import launched_process_group
    from senslora.estimators import ESTIMATORS
    from senslora.models import resolve_dtype
    from senslora.peft_bridge import ALPHA_POLICIES

    try:  # every option is checked before anything is loaded
        config = AllocationConfig(
            avg_rank=avg_rank,
            budget=budget,
            scheme=scheme,
            score=score,
            min_rank=min_rank,
            max_rank=max_rank,
            weighting=weighting,
            top_k_fraction=top_k_fraction,
            effective_rank_threshold=effective_rank_threshold,
            spectrum=spectrum,
            curvature=curvature,
        )
        calibration = CalibrationConfig(
            source=calib,
            num_samples=num_samples,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            text_field=text_field,
        )
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("alpha_policy", alpha_policy, ALPHA_POLICIES)
        resolve_dtype(dtype)
        _refuse_existing(out, OUTPUT_NAMES, overwrite)
        with launched_process_group(device) as rank:
            _allocate(
                config,
                calibration,
                out=out,
                model=model,
                estimator=estimator,
                targets=targets,
                num_probes=num_probes,
                skip_positions=skip_positions,
                outlier_factor=outlier_factor,
                lora_alpha=lora_alpha,
                alpha_policy=alpha_policy,
                device=device,
                device_map=device_map,
                dtype=dtype,
                main_process=rank == 0,
            )
    except USER_ERRORS as error:
        fail(str(error))
    except FloatingPointError as error:
        fail(str(error))


def _refuse_existing(out: Path | None, names: tuple[str, ...], overwrite: bool) -> None:
    existing = [name for name in names if out is not None and (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds {', '.join(existing)}; pass --overwrite to replace it"
        )


def _allocate(
    config,
    calibration,
    *,
    out: Path,
    model: str | None,
    estimator: str,
    targets: str,
    num_probes: int,
    skip_positions: int,
    outlier_factor: float | None,
    lora_alpha: float | None,
    alpha_policy: str,
    device: str,
    device_map: str | None,
    dtype: str,
    main_process: bool,
) -> None:
    import peft

    from senslora import allocate_ranks
    from senslora.data import calibration_batches
    from senslora.estimators import resolve_estimator
    from senslora.models import load_model, load_tokenizer, resolve_model_path
    from senslora.peft_bridge import lora_alphas
    from senslora.pipeline import Calibration, calibrate
    from senslora.report import concentration_note, rank_table
    from senslora.targets import find_target_modules

    say = console if main_process else Console(quiet=True)  # rank 0 alone prints
    model_path = resolve_model_path(model)
    say.print(f"model [bold]{model_path}[/], calibration [bold]{calibration.source}[/]")
    loaded = load_model(model_path, device=device, dtype=dtype, device_map=device_map)
    batches = calibration_batches(load_tokenizer(model_path), calibration)
    keep_gram = config.spectrum == "eigenvalues" or config.curvature == "inverse"
    with warnings.catch_warnings():  # only the progress label: calibrate warns once, below
        warnings.simplefilter("ignore")
        resolved = resolve_estimator(
            estimator,
            loaded,
            find_target_modules(loaded, _target_spec(targets)),
            skip_positions=skip_positions,
            outlier_factor=outlier_factor,
            keep_gram=keep_gram,
        )
    calibrated = calibrate(
        loaded,
        batches,
        estimator=estimator,
        targets=_target_spec(targets),
        keep_gram=keep_gram,
        num_probes=num_probes,
        seed=calibration.seed,
        skip_positions=skip_positions,
        outlier_factor=outlier_factor,
        model_path=model_path,
        calibration=Calibration(config=calibration),
        progress=(lambda b: tracked(b, f"calibrating ({resolved})")) if main_process else None,
    )
    allocation = calibrated.allocate(config)
    variants = {
        score: allocate_ranks(calibrated.stats, dataclasses.replace(config, score=score))
        for score in ("global", "topk", "effective_rank")
    }
    variants["combined"] = allocation

    base = peft.LoraConfig(r=config.avg_rank, lora_alpha=lora_alpha or 2.0 * config.avg_rank)
    lora_config = allocation.to_lora_config(base, alpha_policy=alpha_policy)
    alphas = lora_alphas(allocation.ranks, base, alpha_policy)
    if main_process:
        _write_outputs(out, allocation, lora_config, alphas, variants)

    say.print(rank_table(allocation))
    note = concentration_note(allocation)
    if note:
        say.print(f"[bold yellow]note:[/] {note}", highlight=False)
    provenance = calibrated.provenance
    say.print(
        f"calibration + metrics on {provenance['num_tokens']:,} tokens "
        f"({provenance['num_sequences']} sequences): {provenance['calibration_seconds']:.1f} s"
    )
    say.print(f"wrote {', '.join(str(out / name) for name in OUTPUT_NAMES)}")


def _target_spec(targets: str) -> str | list[str]:
    """all-linear, a regex, or a comma-separated list of module names."""
    if "," in targets:
        return [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def _write_outputs(out: Path, allocation, lora_config, alphas, variants) -> None:
    """All files are written into a staging folder, then moved in together: an error or an
    interruption leaves either every new file or the previous ones (`senslora.files`)."""
    from senslora.files import staged_outputs
    from senslora.report import plot_ranks

    with staged_outputs(out, OUTPUT_NAMES) as tmp:
        lora_config.save_pretrained(tmp)
        allocation.save(str(tmp / "allocation.json"), alphas=alphas)
        plot_ranks(variants, tmp / "ranks.png")


COMPARE_NAMES = ("comparison.json", "comparison.png")


@app.command()
def compare(
    first: Path = typer.Argument(..., help="allocation.json (or its folder) A."),
    second: Path = typer.Argument(..., help="allocation.json (or its folder) B."),
    out: Path = typer.Option(
        None, help="Folder for comparison.json and comparison.png (default: print only)."
    ),
    overwrite: bool = typer.Option(False, help="Replace a comparison already in --out."),
) -> None:
    """How close two allocations of the same model are: Spearman and Kendall correlations of
    theta and of the ranks, share of modules whose rank differs, L1 distance of the ranks."""
    try:
        _compare(first, second, out, overwrite)
    except USER_ERRORS as error:
        fail(str(error))


def _compare(first: Path, second: Path, out: Path | None, overwrite: bool) -> None:
    import json

    from rich.table import Table

    from senslora.compare import compare_allocations, plot_comparison
    from senslora.files import staged_outputs
    from senslora.serialization import load_allocation

    _refuse_existing(out, COMPARE_NAMES, overwrite)
    a, b = load_allocation(first), load_allocation(second)
    result = compare_allocations(a, b)
    table = Table(title=f"{first} (A) vs {second} (B): {result.num_modules} modules")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, value in (
        ("Spearman of theta", result.spearman_theta),
        ("Kendall tau-b of theta", result.kendall_theta),
        ("Spearman of ranks", result.spearman_ranks),
        ("Kendall tau-b of ranks", result.kendall_ranks),
        ("share of ranks that differ", result.share_ranks_differ),
        ("L1 distance of ranks", result.rank_l1),
        ("largest rank difference", result.max_rank_difference),
    ):
        table.add_row(label, "n/a (constant)" if value is None else f"{value:.4g}")
    console.print(table)
    for key, (value_a, value_b) in result.config_differences.items():
        console.print(f"note: {key} differs: {value_a!r} (A) vs {value_b!r} (B)")
    if out is None:
        return
    record = {"first": str(first), "second": str(second), **result.to_dict()}
    with staged_outputs(out, COMPARE_NAMES) as tmp:
        (tmp / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
        plot_comparison(a, b, tmp / "comparison.png", labels=("A", "B"))
    console.print(f"wrote {', '.join(str(out / name) for name in COMPARE_NAMES)}")


def _train_option(name: str, **kwargs):
    """A `senslora train` option whose default and help are TrainConfig's."""
    return typer.Option(default_of(name), help=help_of(name), **kwargs)


@app.command()
def train(
    method: str = _train_option("method"),
    task: str = _train_option("task"),
    glue_dir: str = _train_option("glue_dir"),
    model: str = _train_option("model"),
    avg_rank: int = _train_option("avg_rank"),
    lora_alpha: float = _train_option("lora_alpha"),
    lora_dropout: float = _train_option("lora_dropout"),
    targets: str = _train_option("targets"),
    epochs: int = _train_option("epochs"),
    batch_size: int = _train_option("batch_size"),
    learning_rate: float = _train_option("learning_rate"),
    warmup_ratio: float = _train_option("warmup_ratio"),
    weight_decay: float = _train_option("weight_decay"),
    eval_batch_size: int = _train_option("eval_batch_size"),
    max_new_tokens: int = _train_option("max_new_tokens"),
    adalora_init_rank: int = _train_option("adalora_init_rank"),
    eva_rho: float = _train_option("eva_rho"),
    hyperadalora_width: int = _train_option("hyperadalora_width"),
    hyperadalora_residual: bool = _train_option("hyperadalora_residual"),
    pooling: str = _train_option("pooling"),
    head_learning_rate: float = _train_option("head_learning_rate"),
    standardize_targets: bool = _train_option("standardize_targets"),
    max_length: int = _train_option("max_length"),
    train_limit: int = _train_option("train_limit"),
    dev_limit: int = _train_option("dev_limit"),
    calib: str = _train_option("calib"),
    calib_samples: int = _train_option("calib_samples"),
    calib_seq_len: int = _train_option("calib_seq_len"),
    estimator: str = _train_option("estimator"),
    skip_positions: int = _train_option("skip_positions"),
    outlier_factor: float = _train_option("outlier_factor"),
    max_rank: int = _train_option("max_rank"),
    budget: str = _train_option("budget"),
    eval_steps: int = _train_option("eval_steps"),
    eval_at_start: bool = _train_option("eval_at_start"),
    hyperadalora_init: str = _train_option("hyperadalora_init"),
    seed: int = _train_option("seed"),
    device: str = _train_option("device"),
    dtype: str = _train_option("dtype"),
    mixed_precision: str = _train_option("mixed_precision"),
    out: Path = typer.Option(..., help="Run folder: results.json, adapter/, allocation.json."),
    overwrite: bool = typer.Option(False, help="Redo a finished run."),
    verbose: bool = typer.Option(
        False, help="Show the Trainer's own progress bars and logs and the libraries' warnings."
    ),
) -> None:
    """Fine-tune one method on one task and evaluate every epoch (or every --eval-steps)."""
    from senslora.finetune.tables import adapter_parameters
    from senslora.finetune.training import run_training

    try:
        config = TrainConfig(
            method=method,
            task=task,
            glue_dir=glue_dir,
            model=model,
            avg_rank=avg_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            targets=targets,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            eval_batch_size=eval_batch_size,
            max_new_tokens=max_new_tokens,
            adalora_init_rank=adalora_init_rank,
            eva_rho=eva_rho,
            hyperadalora_width=hyperadalora_width,
            hyperadalora_residual=hyperadalora_residual,
            pooling=pooling,
            head_learning_rate=head_learning_rate,
            standardize_targets=standardize_targets,
            max_length=max_length,
            train_limit=train_limit,
            dev_limit=dev_limit,
            calib=calib,
            calib_samples=calib_samples,
            calib_seq_len=calib_seq_len,
            estimator=estimator,
            skip_positions=skip_positions,
            outlier_factor=outlier_factor,
            max_rank=max_rank,
            budget=budget,
            eval_steps=eval_steps,
            eval_at_start=eval_at_start,
            hyperadalora_init=hyperadalora_init,
            seed=seed,
            device=device,
            dtype=dtype,
            mixed_precision=mixed_precision,
        )
        results = run_training(config, out, overwrite=overwrite, verbose=verbose)
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
    status: bool = typer.Option(
        False,
        help="Say how many runs are finished, running (in which process) and left, with the "
        "time left estimated from the finished runs; run nothing.",
    ),
    verbose: bool = typer.Option(
        False, help="Show the Trainer's own progress bars and logs and the libraries' warnings."
    ),
) -> None:
    """Run a methods x tasks x seeds grid (resumable) and write results.md / results.json."""
    from senslora.finetune.grid import bench_status, load_spec, run_bench, write_summary
    from senslora.finetune.training import run_training

    try:
        bench_spec = load_spec(spec)
        if status:
            _print_status(bench_status(bench_spec))
            return
        if only_summary:
            write_summary(bench_spec)
        else:
            counts = run_bench(
                bench_spec, lambda config, out: run_training(config, out, verbose=verbose)
            )
            busy = f", {counts['busy']} left to other bench processes" if counts["busy"] else ""
            console.print(f"ran {counts['ran']} runs, {counts['skipped']} already finished{busy}")
    except USER_ERRORS as error:
        fail(str(error))
    console.print((bench_spec.out / "results.md").read_text())


def _print_status(status: dict) -> None:
    console.print(
        f"{status['finished']} of {status['total']} runs finished, {len(status['running'])} "
        f"running, {len(status['to_do'])} to do"
    )
    for task, row, seed, pid in status["running"]:
        console.print(f"  running: {task} / {row} / seed {seed} (process {pid})")
    for task, seconds in status["median_wall_seconds"].items():
        console.print(f"  {task}: {seconds / 60:.1f} min per finished run (median)")
    left = status["estimated_seconds_left"]
    if left is not None and left > 0:
        console.print(f"about {left / 3600:.1f} h of runs left for one process")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    quick: bool = typer.Option(False, help="A tiny version for smoke tests (seconds)."),
    overwrite: bool = typer.Option(False, help="Redo finished runs."),
    verbose: bool = typer.Option(
        False, help="Show the Trainer's own progress bars and logs and the libraries' warnings."
    ),
) -> None:
    """The main job: allocate on the Wikipedia sample, fine-tune lora and senslora with the same
    budget on rotten_tomatoes with the shipped MiniLM, and compare."""
    from senslora.finetune.demo import run_demo

    try:
        run_demo(out, quick=quick, overwrite=overwrite, console=console, verbose=verbose)
    except USER_ERRORS as error:
        fail(str(error))
