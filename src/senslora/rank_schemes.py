"""Integer rank allocation from per-matrix sensitivity weights ``theta``; pure functions.

- :func:`scaled_rank_allocation` -- Scaled Rank Allocation (SRA, eq. 15 of Zhang et al., 2025):
  ranks proportional to ``theta`` under a total budget, within per-matrix bounds.
- :func:`progressive_rank_allocation` -- Progressive Rank Allocation (PRA, Section 4.4): ranks
  in a few levels around the average, by the order of ``theta``.

Both take ``theta`` as a sequence, numpy array or tensor (one entry per matrix, finite, >= 0),
bounds as an int (the same for every matrix) or one int per matrix, and return one Python int
per matrix in the same order. Both are deterministic.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from senslora.metrics import as_nonnegative_array

__all__ = ["progressive_rank_allocation", "scaled_rank_allocation"]

_FLOOR_TOL = 1e-9
"""A continuous rank within this of the next integer is rounded up to it before flooring, and
fractional parts equal to within it are ties; so float noise in the bisection does not decide
exact cases (e.g. ``theta = [1, 3]``, budget 2: continuous ranks 0.5 and 1.5)."""

_MAX_BISECTIONS = 2200  # enough to shrink any float64 interval [0, hi] to adjacent floats

IntBounds = int | Sequence[int] | np.ndarray


def _as_ints(values: IntBounds, n: int, name: str, minimum: int) -> np.ndarray:
    """Broadcast an int or check a per-matrix sequence of ints; all must be >= ``minimum``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "iu" or array.ndim > 1:
        raise ValueError(f"{name} must be an int or a 1-D sequence of ints, got {values!r}")
    array = np.broadcast_to(array.astype(np.int64), (n,)) if array.ndim == 0 else array
    if array.shape != (n,):
        raise ValueError(f"{name} must have one entry per matrix ({n}), got {array.size}")
    if (array < minimum).any():
        raise ValueError(f"{name} must be >= {minimum}, got {array.tolist()}")
    return array.astype(np.int64)


def _as_bounds(min_ranks: IntBounds, max_ranks: IntBounds, n: int):
    low = _as_ints(min_ranks, n, "min_ranks", 0)
    high = _as_ints(max_ranks, n, "max_ranks", 0)
    below = np.flatnonzero(high < low)
    if below.size:
        raise ValueError(
            f"max_ranks must be >= min_ranks, but matrices {below.tolist()} have max "
            f"{high[below].tolist()} < min {low[below].tolist()}"
        )
    return low, high


def _spent(ranks: np.ndarray, cost: np.ndarray) -> int:
    return int((ranks * cost).sum())


def _continuous_ranks(theta, budget, low, high, cost) -> np.ndarray:
    """Solve ``sum(cost * clip(lam * theta, low, high)) = budget`` for ``lam`` by bisection.

    The sum is monotone in ``lam``, so matrices capped at ``high`` hand their surplus to the
    others in proportion to ``theta``. If even the ``lam`` that caps every ``theta > 0`` falls
    short (matrices with ``theta == 0`` stay at ``low``), returns that limit. ``math.fsum``
    makes the sum exact, hence independent of the order of the matrices.
    """
    theta = theta / theta.max()
    positive = theta > 0

    def total(lam: float) -> float:
        return math.fsum(cost * np.clip(lam * theta, low, high))

    with np.errstate(over="ignore"):  # tiny theta: the cap is taken as the largest float
        hi = float(np.max(high[positive] / theta[positive]))
    hi = hi if math.isfinite(hi) else float(np.finfo(np.float64).max)
    if total(hi) <= budget:
        return np.clip(hi * theta, low, high)
    lo = 0.0  # total(0) = sum(cost * low) <= budget, checked by the caller
    for _ in range(_MAX_BISECTIONS):
        mid = lo + (hi - lo) / 2
        if mid in (lo, hi):
            break
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return np.clip(lo * theta, low, high)


def _hand_out(ranks, order, budget, high, cost) -> None:
    """Give +1 to the matrices in ``order`` while the budget lasts, cycling; in place."""
    left = budget - _spent(ranks, cost)
    while left > 0:
        given = False
        for i in order:
            if ranks[i] < high[i] and cost[i] <= left:
                ranks[i] += 1
                left -= int(cost[i])
                given = True
        if not given:
            return


def scaled_rank_allocation(
    theta,
    budget: int,
    *,
    min_ranks: IntBounds,
    max_ranks: IntBounds,
    costs: IntBounds | None = None,
) -> list[int]:
    """Scaled Rank Allocation (eq. 15): ``r_w = theta_w / sum(theta) * r_total``, as integers.

    Without ``costs`` every rank unit costs 1 and the ranks sum to exactly ``budget``
    (``r_total``). With ``costs`` (positive ints, e.g. ``d_in + d_out``, the parameters of one
    rank of a LoRA pair) ``sum(rank * cost) <= budget`` and no single further +1 fits: the
    budget is a parameter count, e.g. that of uniform LoRA. Always
    ``min_ranks[i] <= rank[i] <= max_ranks[i]``.

    Continuous step: ``rank = clip(lam * theta, min, max)`` with ``lam`` found by bisection so
    that the (cost-weighted) sum meets the budget; the surplus of capped matrices goes to the
    others in proportion to ``theta``. Integer step: floor, then one unit at a time by largest
    fractional part (ties: larger ``theta``, then lower index), cycling while units remain (e.g.
    to matrices with ``theta == 0`` once all others are capped), skipping matrices at their max
    and, with costs, those whose cost no longer fits. All-zero ``theta`` splits uniformly.
    Among matrices with the same bounds and cost a larger ``theta`` never gets a lower rank.

    Raises ``ValueError`` if ``theta`` is not finite and non-negative, or on infeasible bounds.
    """
    theta = as_nonnegative_array(theta, "theta")
    n = theta.size
    budget = operator.index(budget)
    low, high = _as_bounds(min_ranks, max_ranks, n)
    cost = np.ones(n, dtype=np.int64) if costs is None else _as_ints(costs, n, "costs", 1)
    if _spent(low, cost) > budget:
        raise ValueError(
            f"min_ranks cost {_spent(low, cost)} ({'ranks' if costs is None else 'parameters'})"
            f", more than the budget {budget}"
        )
    if costs is None and high.sum() < budget:
        raise ValueError(f"max_ranks sum to {int(high.sum())} < budget {budget}: cannot spend it")
    weights = theta if theta.any() else np.ones(n)  # all-zero theta: uniform split
    continuous = _continuous_ranks(weights, budget, low, high, cost)
    ranks = np.floor(continuous + _FLOOR_TOL).astype(np.int64)
    if _spent(ranks, cost) > budget:  # only if float noise met the tolerance; never in practice
        ranks = np.floor(continuous).astype(np.int64)
    ranks = np.clip(ranks, low, high)
    fraction = np.round((continuous - ranks).clip(0, 1) / _FLOOR_TOL) * _FLOOR_TOL
    order = sorted(range(n), key=lambda i: (-fraction[i], -theta[i], i))
    _hand_out(ranks, order, budget, high, cost)
    return [int(r) for r in ranks]


def progressive_rank_allocation(
    theta,
    avg_rank: int,
    *,
    num_categories: int = 3,
    step: int = 1,
    min_ranks: IntBounds,
    max_ranks: IntBounds,
) -> list[int]:
    """Progressive Rank Allocation (Section 4.4): ranks in levels by the order of ``theta``.

    The matrices, sorted by ``theta`` descending (ties: lower index first), are split into
    ``num_categories`` groups as equal as possible (earlier groups take the extra, as
    ``numpy.array_split``); group ``c`` gets ``avg_rank + step * ((num_categories - 1) / 2 - c)``.
    Then ranks are clipped to the bounds and the total is made exactly
    ``avg_rank * len(theta)``: while too high, one rank is taken from each matrix in ascending
    ``theta`` order (not below its min); while too low, one is added in descending order (not
    above its max). The paper's example: 6 matrices, average 5, 3 categories ->
    ``6, 6, 5, 5, 4, 4`` in descending ``theta`` order.

    Raises ``ValueError`` when a level is not an integer (``step * (num_categories - 1)`` odd)
    or when the bounds cannot hold the budget.
    """
    theta = as_nonnegative_array(theta, "theta")
    n = theta.size
    avg_rank, step = operator.index(avg_rank), operator.index(step)
    num_categories = operator.index(num_categories)
    if avg_rank < 0 or step < 0 or num_categories < 1:
        raise ValueError(
            "avg_rank and step must be >= 0 and num_categories >= 1, got "
            f"avg_rank={avg_rank}, step={step}, num_categories={num_categories}"
        )
    if step * (num_categories - 1) % 2:
        raise ValueError(
            f"levels avg_rank + step * ((num_categories - 1) / 2 - c) are not integers for "
            f"step={step} and num_categories={num_categories}: with an even number of "
            "categories the step must be even"
        )
    low, high = _as_bounds(min_ranks, max_ranks, n)
    target = avg_rank * n
    if low.sum() > target or high.sum() < target:
        raise ValueError(
            f"bounds cannot hold the budget {target} (= {avg_rank} x {n} matrices): "
            f"min_ranks sum to {int(low.sum())}, max_ranks to {int(high.sum())}"
        )
    order = sorted(range(n), key=lambda i: (-theta[i], i))  # descending theta
    ranks = np.zeros(n, dtype=np.int64)
    half_span = step * (num_categories - 1) // 2
    for c, group in enumerate(np.array_split(np.asarray(order), num_categories)):
        ranks[group] = avg_rank + half_span - step * c
    ranks = np.clip(ranks, low, high)
    while ranks.sum() > target:
        for i in reversed(order):
            if ranks.sum() > target and ranks[i] > low[i]:
                ranks[i] -= 1
    while ranks.sum() < target:
        for i in order:
            if ranks.sum() < target and ranks[i] < high[i]:
                ranks[i] += 1
    return [int(r) for r in ranks]
