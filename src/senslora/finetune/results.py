"""results.json of one run: the configuration, parameter counts, ranks, every evaluation, the
best and the last, timings and peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import re
import resource
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from senslora import __version__
from senslora.finetune.methods import trainable_parameters
from senslora.models import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from senslora.finetune.training import LoadedRun


def evaluations(log_history: list[dict]) -> list[dict[str, float]]:
    """Every evaluation in order: its optimizer step, epoch and every eval_* metric (not runtime
    figures)."""
    rows = []
    for entry in log_history:
        scores = {
            k[len("eval_") :]: v
            for k, v in entry.items()
            if k.startswith("eval_")
            and not k.endswith(("runtime", "per_second", "loss", "steps_per_second"))
        }
        if scores:
            epoch = round(float(entry.get("epoch") or 0.0), 3)
            rows.append({"step": int(entry.get("step", 0)), "epoch": epoch, **scores})
    return rows


STALL_TOLERANCE = 0.02
"""A classification run has stalled when its last logged training loss is within this fraction
of the label prior's loss (`label_prior_loss`)."""


def label_prior_loss(task) -> float | None:
    """The cross-entropy (nats) of predicting the training labels' frequencies for every example,
    i.e. their entropy: the loss of a classifier that has learnt nothing but the label prior
    (0.607 on CoLA, 0.693 on RTE). None for regression and generation."""
    if getattr(task, "num_labels", 1) < 2:
        return None
    counts = Counter(int(example.label) for example in task.train)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def stalled(train_losses: list[float], prior_loss: float | None) -> bool | None:
    """Whether the last logged training loss is still within `STALL_TOLERANCE` of the label
    prior's loss (None where that is undefined: regression and generation; a run of a method
    whose loss carries a regulariser, `Method.regularised_loss`, is not checked)."""
    if prior_loss is None or not train_losses:
        return None
    return train_losses[-1] >= (1.0 - STALL_TOLERANCE) * prior_loss


def stall_message(results: dict) -> str:
    return (
        f"{results['method']} on {results['task']}: the training loss ended at "
        f"{results['train_losses'][-1]:.3f} nats, the label prior's is "
        f"{results['label_prior_loss']:.3f}: the model has learnt nothing beyond the label "
        "frequencies (it stalled). A lower learning rate usually trains: on CoLA, 2e-3 stalls "
        "and 1e-3 trains (docs/results.md)."
    )


def run_results(
    config,
    run: LoadedRun,
    history,
    method,
    prepared,
    timings,
    resumed,
    memory_scope: str = "process",
) -> dict:
    """``history``: the Trainer's log history (with the step-0 evaluation first, if any)."""
    peft_model, task = prepared.model, run.task
    evals = evaluations(history)
    train_losses = [e["loss"] for e in history if "loss" in e]
    prior_loss = label_prior_loss(task)
    # the epochs, best and last are those of the training; a step-0 evaluation stays in evals
    epochs = [{k: v for k, v in row.items() if k != "step"} for row in evals if row["step"] > 0]
    main = main_key(task, epochs)
    best = max(epochs, key=lambda row: row[main]) if epochs else None
    ranks = method.final_ranks(prepared)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    shapes = {
        n: (m.out_features, m.in_features)
        for n, m in base.named_modules()
        if n in (ranks or {}) and hasattr(m, "in_features")
    }
    return {
        "config": config.to_dict(),
        "method": config.method,
        "task": task.name,
        "model": run.model_path,
        "main_metric": main,
        "head_pooling": getattr(base, "pooling", "model"),
        "num_train": len(task.train),
        "num_dev": {k: len(v) for k, v in task.dev.items()},
        "parameters": {
            "trainable": trainable_parameters(peft_model),
            "lora": sum(
                p.numel()
                for n, p in peft_model.named_parameters()
                if p.requires_grad and "lora_" in n
            ),
            "final_lora": sum(r * sum(shapes.get(n, (0, 0))) for n, r in (ranks or {}).items()),
            "hypernetwork": prepared.report.get("hypernetwork_parameters", 0),
        },
        "init_ranks": prepared.report.get("init_ranks"),
        "method_report": {k: v for k, v in prepared.report.items() if k != "init_ranks"},
        "ranks": ranks,
        "epochs": epochs,
        "evals": evals,
        "train_losses": train_losses,
        "label_prior_loss": prior_loss,
        "stalled": None if method.regularised_loss else stalled(train_losses, prior_loss),
        "best": best,
        "last": epochs[-1] if epochs else None,
        "train_seconds": round(timings["train"], 2),
        "wall_seconds": round(timings["wall"], 2),
        "peak_memory_mb": peak_memory_mb(),
        "peak_memory_scope": memory_scope,  # "run", or "process": its high-water mark
        "resumed": resumed,
        "device": str(resolve_device(config.device)),
        "versions": {"senslora": __version__, "torch": torch.__version__},
    }


def main_key(task, epochs: list[dict]) -> str:
    """The key of the task's main metric in the epoch rows (first dev split for MNLI)."""
    if not epochs:
        return task.main_metric
    for key in epochs[0]:
        if key == task.main_metric or key.endswith("_" + task.main_metric):
            return key
    raise KeyError(f"main metric {task.main_metric!r} missing from {sorted(epochs[0])}")


_PROC = Path("/proc/self")


def release_memory() -> bool:
    """Give the memory an earlier run freed back to the system: collect garbage, then empty
    torch's CUDA cache, or on the CPU ask glibc to return its free pages (``malloc_trim``).
    Without it a process keeps what an earlier run freed (about 0.8 GB after a MiniLM run), so a
    later run's resident memory, and its peak, start higher than the first run's. Returns
    whether the allocator was asked (False where there is no glibc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return True
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():  # looked up once: find_library runs ldconfig
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no libc found, or not glibc (musl, macOS)
        return None


def reset_peak_memory() -> str:
    """Start a run's peak-memory window, so that a process running several runs (a bench grid,
    the demo) does not report an earlier run's peak: the memory earlier runs freed goes back to
    the system first (`release_memory`). Returns the scope `peak_memory_mb` will measure:
    ``"run"``, or ``"process"`` where the CPU peak cannot be reset (no Linux /proc): the
    process's high-water mark since it started, an upper bound of the run's."""
    release_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "run"
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
        (_PROC / "clear_refs").write_text("5")
    except OSError:
        return "process"
    return "run" if _vm_hwm_kib() is not None else "process"


def peak_memory_mb() -> float:
    """Peak memory in MiB since `reset_peak_memory`: on a GPU every live tensor of the process
    (`torch.cuda.max_memory_allocated`), on the CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    kib = _vm_hwm_kib()
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)


def _vm_hwm_kib() -> int | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", (_PROC / "status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None
