"""Three estimators of the per-module Hessian diagonal behind one function, `collect_statistics`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from senslora.batches import Batch, LossFn, _is_causal_lm, default_loss, right_align_padding
from senslora.distributed import all_reduce_statistics, distributed_world, shard_batches
from senslora.estimators.activation import collect_activation_statistics
from senslora.estimators.gradients import (
    collect_fisher_statistics,
    collect_hutchinson_statistics,
)
from senslora.stats import ModuleStats
from senslora.targets import TargetSpec, find_target_modules

ESTIMATORS = ("auto", "activation", "fisher", "hutchinson")
DEFAULT_ESTIMATOR = "auto"
"""The default of the entry points (`senslora allocate`, `senslora train`, `calibrate`,
`compute_allocation`, `get_peft_model`): 'auto' picks per model (`resolve_estimator`). The
primitive `collect_statistics` keeps the paper's 'activation' unless told otherwise."""


def resolve_estimator(
    estimator: str,
    model: nn.Module,
    modules: dict[str, nn.Module] | None = None,
    *,
    skip_positions: int = 0,
    outlier_factor: float | None = None,
    keep_gram: bool = False,
) -> str:
    """The estimator that ``"auto"`` stands for on ``model`` (any other name is returned as is).

    ``"fisher"`` (the next-token loss, free on any text) for a causal LM whose target weights are
    all in memory and in floating point; ``"activation"`` otherwise: for encoders (the paper's
    GPTQ statistics), for offloaded or quantized weights (no gradient to read), and when the
    caller asks for what only the activation statistics give: token filters (``skip_positions``,
    ``outlier_factor``) or the Gram matrix (``keep_gram``: the eigenvalue spectrum, the
    inverse-Hessian curvature), and, with a warning, when the Fisher's gradients and float32
    accumulators (`fisher_memory_bytes`) would not fit in the free memory of the weights' device
    (`available_memory_bytes`; 6 bytes per adapted bf16 weight, about 42 GB for LLaMA3.1-8B).
    Why the causal-LM rule:
    the activation trace of a decoder is dominated by its attention sink, the Fisher is not, and
    on the WordNet benchmark the Fisher allocation trains as well as uniform LoRA where the
    activation one trains worse (docs/method.md, "Decoders and massive activations")."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator != "auto":
        return estimator
    activation_only = keep_gram or bool(skip_positions) or outlier_factor is not None
    if activation_only or not _is_causal_lm(model):
        return "activation"
    if modules is not None and not all(_differentiable(m) for m in modules.values()):
        return "activation"
    if modules is not None and (short := _memory_shortfall(modules)) is not None:
        device, needed, free = short
        warnings.warn(
            f"estimator='auto': the next-token Fisher needs about {needed / 2**30:.1f} GiB on "
            f"{device} for its gradients and float32 accumulators (the size of the adapted "
            f"weights), and {free / 2**30:.1f} GiB are free there; using the activation "
            "statistics instead (pass estimator='fisher' to insist, or 'activation' with "
            "outlier_factor=10 for a decoder; docs/method.md)",
            stacklevel=2,
        )
        return "activation"
    return "fisher"


def _differentiable(module: nn.Module) -> bool:
    weight = module.weight
    return weight.device.type != "meta" and weight.is_floating_point()


def fisher_memory_bytes(modules: dict[str, nn.Module]) -> dict[torch.device, int]:
    """Bytes the Fisher estimator holds beyond the model, per device: a float32 accumulator and
    one gradient (in the weight's dtype) per target weight (`collect_fisher_statistics`)."""
    needed: dict[torch.device, int] = {}
    for module in modules.values():
        weight = module.weight
        needed[weight.device] = needed.get(weight.device, 0) + weight.numel() * (
            4 + weight.element_size()
        )
    return needed


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the CUDA driver's free bytes, or the operating system's
    MemAvailable for the CPU; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _memory_shortfall(modules: dict[str, nn.Module]) -> tuple[torch.device, int, int] | None:
    """(device, bytes needed, bytes free) of the first device where the Fisher's memory
    (`fisher_memory_bytes`) exceeds the free memory, or None where it fits or cannot be told."""
    for device, needed in fisher_memory_bytes(modules).items():
        free = available_memory_bytes(device)
        if free is not None and needed > free:
            return device, needed, free
    return None


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    estimator: str = "activation",
    targets: TargetSpec = "all-linear",
    loss_fn: LossFn | None = None,
    num_probes: int = 8,
    *,
    include_heads: bool = False,
    keep_gram: bool = False,
    per_sample: bool = True,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    skip_positions: int = 0,
    outlier_factor: float | None = None,
) -> dict[str, ModuleStats]:
    """Curvature statistics of every target module of ``model`` over the calibration ``batches``.

    Args:
        model: a transformers model or any torch module with Linear/Conv1D layers.
        batches: an iterable of dicts (``model(**batch)``) or tuples (``model(batch[0])``).
        estimator: ``"activation"`` (GPTQ 2·XXᵀ from forward hooks, no labels; the default
            here, the paper's), ``"fisher"`` (empirical Fisher diagonal), ``"hutchinson"`` (true
            Hessian diagonal) or ``"auto"`` (fisher for a causal LM, activation otherwise:
            `resolve_estimator`; the default of the entry points, `DEFAULT_ESTIMATOR`).
        targets: ``"all-linear"``, a list of module names (peft-style suffix match) or a regex.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for fisher/hutchinson; default: the model's
            own ``.loss`` (causal LMs get the next-token loss on their real tokens).
        num_probes: Rademacher probes per batch (hutchinson).
        include_heads: also adapt heads such as ``classifier`` and ``lm_head``.
        keep_gram: also accumulate the full 2·XXᵀ (activation; O(d_in²) per module) for the
            eigenvalue spectrum.
        per_sample: fisher from per-sample gradients (default) or per-batch gradients.
        autocast_dtype: run the activation forward under autocast (e.g. torch.bfloat16 on GPU);
            accumulation stays float32.
        seed: seed of the Hutchinson probes (process ``rank`` of a distributed run uses
            ``seed + rank``).
        distributed: shard the batches over the torch.distributed processes (batch i goes to rank
            i mod world size) and all-reduce the statistics, so that every process returns those
            of all the batches. None: automatic when a process group with more than one process
            is initialised. Every process must call this with the same model and batches.
        skip_positions: activation only: leave the first n real tokens of every sequence out of
            the statistics (the attention-sink position of a decoder; 0, the default, keeps all).
        outlier_factor: activation only: leave out, in each layer input of each batch, the
            tokens whose input norm exceeds this many times the median token norm (massive
            activations; None, the default, keeps all). See
            `senslora.estimators.token_filters` and docs/method.md.

    Left-padded dict batches are right-aligned first (see `senslora.batches.right_align_padding`)
    so that the statistics do not depend on the padding side.

    Returns:
        ``{full module name: ModuleStats}`` in model order.
    """
    modules = find_target_modules(model, targets, include_heads=include_heads)
    estimator = resolve_estimator(
        estimator,
        model,
        modules,
        skip_positions=skip_positions,
        outlier_factor=outlier_factor,
        keep_gram=keep_gram,
    )
    if estimator != "activation" and (skip_positions or outlier_factor is not None):
        raise ValueError(
            "skip_positions and outlier_factor filter the tokens of the activation estimator, "
            f"got them with estimator={estimator!r}"
        )
    if estimator != "activation":
        _check_differentiable(modules, estimator)
    world = distributed_world(distributed)
    if world is not None:
        rank, world_size = world
        batches = shard_batches(batches, rank, world_size)
        seed += rank
    batches = map(right_align_padding, batches)
    if estimator == "activation":
        stats = collect_activation_statistics(
            model,
            modules,
            batches,
            keep_gram=keep_gram,
            autocast_dtype=autocast_dtype,
            skip_positions=skip_positions,
            outlier_factor=outlier_factor,
        )
    elif estimator == "fisher":
        stats = collect_fisher_statistics(
            model, modules, batches, loss_fn or default_loss, per_sample=per_sample
        )
    else:
        stats = collect_hutchinson_statistics(
            model, modules, batches, loss_fn or default_loss, num_probes=num_probes, seed=seed
        )
    if world is not None:  # every process reaches this, even with no batch of its own
        stats = all_reduce_statistics(stats)
    _check_collected(stats)
    return stats


def _check_differentiable(modules: dict[str, nn.Module], estimator: str) -> None:
    """The gradient estimators need every target weight in memory and in floating point."""
    for name, module in modules.items():
        weight = module.weight
        if weight.device.type == "meta":
            raise ValueError(
                f"the {estimator} estimator needs every target weight in memory, but {name} is "
                "offloaded (meta device, accelerate device_map/offloading); use the activation "
                "estimator"
            )
        if not weight.is_floating_point():
            raise ValueError(
                f"the {estimator} estimator needs floating-point weights, but {name} has a "
                f"{weight.dtype} weight ({type(module).__name__}, quantized?); use the activation "
                "estimator"
            )


def _check_collected(stats: dict[str, ModuleStats]) -> None:
    """No batch reached the modules, or the values are not finite: say which module and why.

    The values are checked all at once, one device synchronisation per device (not one per
    module, hundreds on a large model); only a failure looks for the module to blame.
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, s in stats.items():
        if s.num_tokens == 0:
            raise ValueError(
                f"calibration set is empty: module {name} saw no tokens (no batch, or only padding)"
            )
        values = s.column_values if s.column_values is not None else s.diagonal
        if values is not None:
            by_device.setdefault(values.device, []).append((name, values))
    for named in by_device.values():
        if bool(torch.isfinite(torch.cat([v.reshape(-1) for _, v in named])).all()):
            continue
        name = next(n for n, v in named if not bool(torch.isfinite(v).all()))
        raise FloatingPointError(
            f"non-finite curvature statistics in module {name} (NaN or Inf in its inputs or "
            "gradients); run the calibration in float32"
        )


__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "ModuleStats",
    "available_memory_bytes",
    "collect_statistics",
    "fisher_memory_bytes",
    "resolve_estimator",
]
