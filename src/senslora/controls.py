"""Controls of an equal-parameter study: is it the sensitivity, or the shapes and the budget?

Pure functions that build the rows a sensitivity allocation is compared with, each at the same
trainable-parameter count as the row it stands beside:

- :func:`matched_uniform_rank` -- the uniform LoRA rank whose parameter count is closest to a
  given allocation's (``lora-matched``);
- :func:`size_prior_allocation` -- theta = d_out * d_in, no calibration data at all, through the
  same SRA rounding and budget as senslora (``size-prior``): "is it the data or the shapes?";
- :func:`shuffle_ranks` -- an allocation's ranks permuted at random among matrices of the same
  shape (``shuffled``): same parameter count and shape profile, per-matrix sensitivity destroyed.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from senslora.allocation import Allocation, integer_ranks
from senslora.config import AllocationConfig
from senslora.targets import TargetSpec, find_target_modules, layer_shape

__all__ = [
    "matched_uniform_rank",
    "model_shapes",
    "shuffle_ranks",
    "size_prior_allocation",
    "uniform_lora_parameters",
]

Shapes = Mapping[str, tuple[int, int]]

_MAX_REDRAWS = 1000
"""Redraws of a shape group's permutation that left its ranks unchanged (each redraw succeeds
with probability >= 1/2 when the group has two distinct ranks)."""


def _checked_shapes(shapes: Shapes) -> dict[str, tuple[int, int]]:
    if not shapes:
        raise ValueError("expected at least one module shape, got none")
    checked = {}
    for name, shape in shapes.items():
        d_out, d_in = (operator.index(d) for d in shape)
        if d_out < 1 or d_in < 1:
            raise ValueError(f"expected positive (d_out, d_in) for {name}, got {tuple(shape)}")
        checked[name] = (d_out, d_in)
    return checked


def uniform_lora_parameters(shapes: Shapes, rank: int) -> int:
    """Trainable parameters of uniform LoRA ``rank`` on every matrix: ``min(rank, d_out, d_in)
    * (d_out + d_in)`` each (a rank never exceeds the matrix's, as in `allocate_ranks`)."""
    rank = operator.index(rank)
    if rank < 0:
        raise ValueError(f"expected a rank >= 0, got {rank}")
    return sum(
        min(rank, d_out, d_in) * (d_out + d_in) for d_out, d_in in _checked_shapes(shapes).values()
    )


def matched_uniform_rank(shapes: Shapes, num_parameters: int) -> int:
    """The uniform LoRA rank (>= 1) whose parameter count is closest to ``num_parameters``.

    ``shapes`` is ``{module: (d_out, d_in)}``, e.g. ``Allocation.shapes``; the count of rank r is
    :func:`uniform_lora_parameters`. On MiniLM-L6 (36 matrices, 41,472 parameters per unit of
    rank) senslora's 209,664 give r = 5 (207,360).

    Ties (two ranks equally far) go to the **larger** rank: the uniform baseline is then never
    the row with fewer parameters, so an allocation that wins against it at a tie cannot owe the
    win to extra parameters. Ranks above the largest matrix's cap add nothing, so the search
    stops there.
    """
    num_parameters = operator.index(num_parameters)
    if num_parameters < 1:
        raise ValueError(f"expected a positive parameter count, got {num_parameters}")
    shapes = _checked_shapes(shapes)
    largest = max(min(shape) for shape in shapes.values())
    best, best_gap = 1, abs(uniform_lora_parameters(shapes, 1) - num_parameters)
    for rank in range(2, largest + 1):
        count = uniform_lora_parameters(shapes, rank)
        gap = abs(count - num_parameters)
        if gap <= best_gap:  # '<=': a tie goes to the larger rank
            best, best_gap = rank, gap
        if count >= num_parameters:  # counts only grow from here
            break
    return best


def model_shapes(
    model: nn.Module, targets: TargetSpec = "all-linear", *, include_heads: bool = False
) -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` of the target modules, read from the layers (no forward)."""
    modules = find_target_modules(model, targets, include_heads=include_heads)
    return {
        name: (layer_shape(m).out_features, layer_shape(m).in_features)
        for name, m in modules.items()
    }


def size_prior_allocation(
    shapes: Shapes,
    config: AllocationConfig | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Allocation:
    """A data-free allocation: theta = d_out * d_in, through the same rounding and budget.

    With the activation estimator the trace of a matrix is ``2 * d_out * ||X||_F^2``: a size
    prior times the input energy. This control keeps the size and drops the data (no calibration
    pass, no weights), so that a sensitivity allocation can be told apart from its shapes. The
    metrics hold ``trace = s_global = theta = d_out * d_in`` (the trace of a unit Hessian
    diagonal); the local metrics are not measured and are 0.0. Provenance says "size prior".
    """
    config = config or AllocationConfig()
    shapes = _checked_shapes(shapes)
    names = list(shapes)
    theta = [float(d_out * d_in) for d_out, d_in in shapes.values()]
    ranks = integer_ranks(theta, [shapes[n] for n in names], config)
    metrics = {
        name: {
            "trace": value,
            "top_k_mean": 0.0,
            "effective_rank": 0.0,
            "s_global": value,
            "s_local": 0.0,
            "theta": value,
        }
        for name, value in zip(names, theta, strict=True)
    }
    return Allocation(
        ranks=dict(zip(names, ranks, strict=True)),
        shapes=shapes,
        metrics=metrics,
        weights={},
        config=config,
        provenance={**(provenance or {}), "control": "size prior", "estimator": "size prior"},
    )


def shuffle_ranks(allocation: Allocation, seed: int = 0) -> Allocation:
    """``allocation`` with its ranks permuted at random among matrices of the same shape.

    The parameter count, the multiset of ranks of every shape and so the shape profile are kept
    exactly; which matrix of a shape gets which rank is drawn with ``numpy.random.default_rng(
    seed)``. A group whose ranks are not all equal is redrawn until its ranks change, so the
    control differs from the original whenever it can. The metrics stay those measured on each
    module (so theta no longer orders the ranks); provenance records the seed and the
    permutation as ``{module: module whose rank it got}``.
    """
    seed = operator.index(seed)
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, int], list[str]] = {}
    for name in allocation.ranks:
        groups.setdefault(tuple(allocation.shapes[name]), []).append(name)
    source = {name: name for name in allocation.ranks}
    for names in groups.values():
        origins = _changing_permutation(names, allocation.ranks, rng)
        source.update(zip(names, origins, strict=True))
    return Allocation(
        ranks={name: allocation.ranks[source[name]] for name in allocation.ranks},
        shapes=dict(allocation.shapes),
        metrics={name: dict(values) for name, values in allocation.metrics.items()},
        weights=dict(allocation.weights),
        config=allocation.config,
        provenance={
            **allocation.provenance,
            "control": "shuffled within shape",
            "shuffle_seed": seed,
            "permutation": source,
        },
    )


def _changing_permutation(
    names: list[str], ranks: Mapping[str, int], rng: np.random.Generator
) -> list[str]:
    """A uniformly drawn permutation of ``names`` that changes their ranks when that is possible
    (rejection sampling; after `_MAX_REDRAWS` misses, two names with different ranks swap)."""
    values = [ranks[n] for n in names]
    if len(set(values)) < 2:
        return [names[i] for i in rng.permutation(len(names))]
    for _ in range(_MAX_REDRAWS):
        order = rng.permutation(len(names))
        if any(values[j] != values[i] for i, j in enumerate(order)):
            return [names[j] for j in order]
    first = next(i for i, v in enumerate(values) if v != values[0])  # pragma: no cover
    order = list(range(len(names)))  # pragma: no cover
    order[0], order[first] = first, 0  # pragma: no cover
    return [names[j] for j in order]  # pragma: no cover
