"""results.json of one run: the configuration, parameter counts, ranks, every evaluation, the
best and the last, timings and peak memory."""

from __future__ import annotations

import resource
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


def run_results(config, run: LoadedRun, history, method, prepared, timings, resumed) -> dict:
    """``history``: the Trainer's log history (with the step-0 evaluation first, if any)."""
    peft_model, task = prepared.model, run.task
    evals = evaluations(history)
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
        "train_losses": [e["loss"] for e in history if "loss" in e],
        "best": best,
        "last": epochs[-1] if epochs else None,
        "train_seconds": round(timings["train"], 2),
        "wall_seconds": round(timings["wall"], 2),
        "peak_memory_mb": peak_memory_mb(),
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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
