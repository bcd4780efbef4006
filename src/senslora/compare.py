"""How close are two allocations of the same model? Rank correlations and rank differences.

`compare_allocations` is pure: Spearman and Kendall (tau-b) correlations of the sensitivity scores
theta and of the integer ranks over the common modules, the share of modules whose rank differs
and the L1 distance of the two rank vectors. `plot_comparison` draws both allocations per layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from senslora.allocation import Allocation
from senslora.report import layer_totals, save_png

__all__ = [
    "AllocationComparison",
    "check_same_modules",
    "compare_allocations",
    "kendall",
    "plot_comparison",
    "spearman",
]


@dataclass(frozen=True)
class AllocationComparison:
    """Agreement of allocation B with allocation A (correlations are None when undefined: a
    constant vector, e.g. uniform ranks)."""

    num_modules: int
    spearman_theta: float | None
    kendall_theta: float | None
    spearman_ranks: float | None
    kendall_ranks: float | None
    share_ranks_differ: float
    """Share of modules whose rank differs."""
    rank_l1: int
    """Sum over modules of |rank_A - rank_B|."""
    max_rank_difference: int
    largest_differences: list[tuple[str, int, int]]
    """Up to five (module, rank A, rank B) with the largest |difference|, largest first."""
    config_differences: dict[str, tuple[Any, Any]]
    """AllocationConfig fields that differ: {field: (A, B)}."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_same_modules(a: Allocation, b: Allocation) -> None:
    """Raise ValueError unless both allocations cover the same modules with the same shapes."""
    only_a = [name for name in a.ranks if name not in b.ranks]
    only_b = [name for name in b.ranks if name not in a.ranks]
    if only_a or only_b:
        raise ValueError(
            "the allocations cover different modules: expected the same module names, got "
            f"{len(only_a)} only in the first (e.g. {only_a[:2]}) and {len(only_b)} only in the "
            f"second (e.g. {only_b[:2]})"
        )
    for name, shape in a.shapes.items():
        if tuple(b.shapes[name]) != tuple(shape):
            raise ValueError(
                f"the allocations are for different models: {name} is {shape[0]}x{shape[1]} in "
                f"the first and {b.shapes[name][0]}x{b.shapes[name][1]} in the second"
            )


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None if either side is constant."""
    return _correlation("spearmanr", x, y)


def kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (corrected for ties); None if either side is constant."""
    return _correlation("kendalltau", x, y)


def _correlation(kind: str, x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(getattr(stats, kind)(x, y).statistic)
    return value if np.isfinite(value) else None


def compare_allocations(a: Allocation, b: Allocation) -> AllocationComparison:
    """Agreement of ``b`` with ``a`` over their modules (which must be the same)."""
    check_same_modules(a, b)
    names = list(a.ranks)
    theta_a = [a.metrics[n]["theta"] for n in names]
    theta_b = [b.metrics[n]["theta"] for n in names]
    ranks_a = np.array([a.ranks[n] for n in names])
    ranks_b = np.array([b.ranks[n] for n in names])
    difference = np.abs(ranks_a - ranks_b)
    order = sorted(range(len(names)), key=lambda i: (-difference[i], i))[:5]
    config_a, config_b = a.config.to_dict(), b.config.to_dict()
    return AllocationComparison(
        num_modules=len(names),
        spearman_theta=spearman(theta_a, theta_b),
        kendall_theta=kendall(theta_a, theta_b),
        spearman_ranks=spearman(ranks_a, ranks_b),
        kendall_ranks=kendall(ranks_a, ranks_b),
        share_ranks_differ=float(np.mean(difference > 0)),
        rank_l1=int(difference.sum()),
        max_rank_difference=int(difference.max()),
        largest_differences=[
            (names[i], int(ranks_a[i]), int(ranks_b[i])) for i in order if difference[i] > 0
        ],
        config_differences={
            key: (config_a[key], config_b.get(key))
            for key in config_a
            if config_a[key] != config_b.get(key)
        },
    )


def plot_comparison(
    a: Allocation, b: Allocation, path: str | Path, labels: tuple[str, str] = ("A", "B")
) -> Path:
    """Rank per layer of both allocations (bars) and rank per module, B against A (scatter).
    Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_same_modules(a, b)
    totals_a, totals_b = layer_totals(a.ranks), layer_totals(b.ranks)
    layers = list(totals_a)
    x = np.arange(len(layers))
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(max(9.0, 0.5 * len(layers) + 5), 4.2))
    bars.bar(x - 0.2, [totals_a[layer] for layer in layers], 0.4, label=labels[0])
    bars.bar(x + 0.2, [totals_b.get(layer, 0) for layer in layers], 0.4, label=labels[1])
    bars.set_xticks(x, ["-" if layer is None else str(layer) for layer in layers])
    bars.set_xlabel("layer")
    bars.set_ylabel("rank allocated to the layer")
    bars.legend(fontsize=8)
    ranks_a = [a.ranks[n] for n in a.ranks]
    ranks_b = [b.ranks[n] for n in a.ranks]
    top = max(max(ranks_a), max(ranks_b), 1)
    scatter.plot([0, top], [0, top], color="grey", linewidth=0.8)
    scatter.scatter(ranks_a, ranks_b, s=12, alpha=0.7)
    if top > 20 * max(1, int(np.median(ranks_a + ranks_b))):  # a few very large ranks
        scatter.set_xscale("symlog")
        scatter.set_yscale("symlog")
    scatter.set_xlabel(f"rank ({labels[0]})")
    scatter.set_ylabel(f"rank ({labels[1]})")
    scatter.set_title("rank per module", fontsize=10)
    return save_png(fig, path, dpi=110)
