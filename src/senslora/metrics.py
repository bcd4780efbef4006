"""Sensitivity metrics of one weight matrix and their combination across matrices.

Pure functions of Hessian diagonals: nothing here touches a model.

The diagonal of a matrix's Hessian may be given compactly as ``values`` (any shape, read
flattened) with every entry repeated ``multiplicity`` times, so the matrix has
``N = multiplicity * values.numel()`` diagonal entries. For example the GPTQ activation Hessian
gives the column value ``2 * sum_t x_tj^2`` to each of the ``d_out`` rows: ``values`` has
``d_in`` entries and ``multiplicity = d_out``. Every metric is computed exactly from the
compact form: only ``values`` is sorted, and the repetition is accounted for arithmetically,
so the ``N`` entries are never materialised. Computation is in float64 on the CPU.

Per matrix (Zhang et al., 2025, Section 3.2):

- :func:`trace` -- the global metric ``S_global`` (eq. 8);
- :func:`top_k_mean` -- ``S_Topk``, the mean of the ``k`` largest entries (eq. 9);
- :func:`effective_rank` -- ``S_EffectiveRank``, the fewest entries holding a fraction
  ``alpha`` of the trace (eq. 10).

Across matrices, :func:`sensitivity_scores` weighs the metrics into the local score
``S_local`` (eqs. 11-12) and the allocation weight ``theta`` (eqs. 13-14).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from senslora.config import NEGATIVE_MODES, SCORES, WEIGHTINGS, check_choice

__all__ = [
    "EFFECTIVE_RANK_RTOL",
    "SensitivityScores",
    "combination_weight",
    "effective_rank",
    "make_nonnegative",
    "sensitivity_scores",
    "spectrum_metrics",
    "top_k_count",
    "top_k_mean",
    "trace",
]

EFFECTIVE_RANK_RTOL = 1e-9
"""Tolerance of :func:`effective_rank`, relative to the trace.

A partial sum that falls short of ``alpha * total`` by no more than ``EFFECTIVE_RANK_RTOL *
total`` counts as reaching it. Without it, float rounding of ``alpha * total`` would decide
exact cases: ``0.28 * 25`` is ``7.000000000000001`` in float64, so 25 unit entries would need
8 entries to reach 28 % of their sum instead of 7."""


def _as_float64(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """Return ``values`` flattened as a float64 NumPy array on the CPU (a copy only when needed).

    The metrics run on small per-matrix vectors (one value per input column for the default
    estimator), where NumPy's per-call overhead is a fraction of torch's: the metrics of all 36
    MiniLM matrices are a few hundred NumPy calls.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_entries(values: np.ndarray, multiplicity: int) -> None:
    """Raise ``ValueError`` on NaN/Inf or negative entries (counted with multiplicity)."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = int((~finite).sum()) * multiplicity
        raise ValueError(f"Hessian diagonal must be finite, got {bad} NaN or Inf entries")
    negative = int((values < 0).sum()) * multiplicity
    if negative:
        raise ValueError(
            f"Hessian diagonal must be non-negative, got {negative} negative entries "
            f"(of {values.size * multiplicity}); use make_nonnegative"
        )


def _check_multiplicity(multiplicity: int) -> int:
    multiplicity = operator.index(multiplicity)
    if multiplicity < 1:
        raise ValueError(f"multiplicity must be a positive integer, got {multiplicity}")
    return multiplicity


def _sorted_descending(values, multiplicity: int) -> tuple[np.ndarray, int]:
    """Validate the compact diagonal and return its values sorted descending, float64."""
    multiplicity = _check_multiplicity(multiplicity)
    if isinstance(values, torch.Tensor) and values.dtype == torch.float32:
        # float32 -> float64 is exact and monotone: sort first, in the cheaper dtype
        flat = values.detach().to(device="cpu").reshape(-1).numpy()
        _check_entries(flat, multiplicity)
        return np.sort(flat)[::-1].astype(np.float64), multiplicity
    flat = _as_float64(values)
    _check_entries(flat, multiplicity)
    return np.sort(flat)[::-1], multiplicity


def trace(values, multiplicity: int = 1) -> float:
    """``S_global = tr(H) = sum_i h_ii`` (eq. 8), with each value counted ``multiplicity`` times.

    Raises ``ValueError`` on negative, NaN or Inf entries.
    """
    multiplicity = _check_multiplicity(multiplicity)
    flat = _as_float64(values)
    _check_entries(flat, multiplicity)
    return multiplicity * float(flat.sum())


def top_k_count(num_entries: int, fraction: float = 0.5) -> int:
    """Return ``k = max(1, floor(num_entries * fraction))`` for :func:`top_k_mean`.

    The paper uses ``fraction = 1/2`` (Appendix A.2) and ``1/3`` (Appendix B.2). A product
    within ``1e-9`` (relative) of an integer is taken as that integer, so ``fraction=1/3`` of
    300 entries gives 100, not the 99 that float rounding of ``300 * (1/3)`` would floor to.
    """
    num_entries = operator.index(num_entries)
    if num_entries < 1:
        raise ValueError(f"num_entries must be a positive integer, got {num_entries}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    product = num_entries * fraction
    nearest = round(product)
    k = nearest if abs(product - nearest) <= 1e-9 * max(1.0, product) else math.floor(product)
    return max(1, k)


def top_k_mean(values, multiplicity: int = 1, *, k: int) -> float:
    """``S_Topk = (1/k) sum_{i<=k} lambda_i`` (eq. 9), the mean of the ``k`` largest entries.

    Exact on the compact form: the ``k`` largest of the ``N`` entries are the
    ``q = k // multiplicity`` largest values, each ``multiplicity`` times, plus
    ``k % multiplicity`` copies of the next value. ``k`` must lie in ``[1, N]``; see
    :func:`top_k_count`.
    """
    ordered, multiplicity = _sorted_descending(values, multiplicity)
    return _top_k_mean_of_sorted(ordered, multiplicity, k)


def _top_k_mean_of_sorted(ordered: np.ndarray, multiplicity: int, k: int) -> float:
    k = operator.index(k)
    num_entries = ordered.size * multiplicity
    if not 1 <= k <= num_entries:
        raise ValueError(f"k must be in [1, {num_entries}] (the number of entries), got {k}")
    full_blocks, rest = divmod(k, multiplicity)
    total = multiplicity * float(ordered[:full_blocks].sum())
    if rest:
        total += rest * float(ordered[full_blocks])
    return total / k


def effective_rank(values, multiplicity: int = 1, alpha: float = 0.85) -> int:
    """``S_EffectiveRank = min{k : sum_{j<=k} lambda_j >= alpha * sum_j lambda_j}`` (eq. 10).

    The partial sums run over the ``N`` entries in non-increasing order. A partial sum within
    ``EFFECTIVE_RANK_RTOL * total`` below the threshold counts as reaching it (see
    :data:`EFFECTIVE_RANK_RTOL`); with ``alpha = 1`` this drops trailing entries that together
    hold less than that fraction of the trace. The effective rank of an all-zero (or empty)
    diagonal is defined as 0: no entry carries any of the (zero) trace.

    Exact on the compact form: find the first sorted value whose block of ``multiplicity``
    copies brings the cumulative sum to the threshold, then the fewest copies ``c`` of it that
    do, using the same comparison ``before + c * value >= threshold`` as a naive cumulative sum.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    ordered, multiplicity = _sorted_descending(values, multiplicity)
    return _effective_rank_of_sorted(ordered, multiplicity, alpha)


def _effective_rank_of_sorted(ordered: np.ndarray, multiplicity: int, alpha: float) -> int:
    if ordered.size == 0 or float(ordered[0]) == 0.0:
        return 0
    block_ends = np.cumsum(multiplicity * ordered)  # cumulative sum after each block
    total = float(block_ends[-1])
    threshold = (alpha - EFFECTIVE_RANK_RTOL) * total  # < total, so some block reaches it
    block = int(np.searchsorted(block_ends, threshold, side="left"))
    before = float(block_ends[block - 1]) if block > 0 else 0.0
    value = float(ordered[block])  # > 0: a zero block cannot be the first to reach threshold
    copies = min(max(math.ceil((threshold - before) / value), 1), multiplicity)
    # The division may round either way: settle on the comparison itself.
    while copies > 1 and before + (copies - 1) * value >= threshold:
        copies -= 1
    while copies < multiplicity and before + copies * value < threshold:
        copies += 1
    return block * multiplicity + copies


def spectrum_metrics(
    values, multiplicity: int = 1, *, k: int, alpha: float = 0.85
) -> tuple[float, float, int]:
    """``(trace, top_k_mean, effective_rank)`` of one matrix, validating and sorting once.

    The same numbers, bit for bit, as :func:`trace`, :func:`top_k_mean` and
    :func:`effective_rank` called one by one, which validate the entries three times and sort them
    twice: for a full Hessian diagonal (gradient estimators, ``d_out * d_in`` entries per matrix)
    the sorting is most of the cost of the metrics.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    ordered, multiplicity = _sorted_descending(values, multiplicity)
    total = multiplicity * float(_as_float64(values).sum())  # as trace(): unsorted order
    return (
        total,
        _top_k_mean_of_sorted(ordered, multiplicity, k),
        _effective_rank_of_sorted(ordered, multiplicity, alpha),
    )


def spectrum_metrics_rows(
    values, multiplicity: int = 1, *, k: int, alpha: float = 0.85
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`spectrum_metrics` of every row of ``values`` (n, d) at once: arrays of the n
    traces, Top-k means and effective ranks.

    The same numbers as ``spectrum_metrics(row, multiplicity, k=k, alpha=alpha)`` row by row
    (same dtype of the sort, same order of every sum; tested), in a few NumPy calls instead of a
    few per row: the matrices of one shape (a model has a handful of shapes) are done together.
    A row that fails validation raises the error :func:`spectrum_metrics` would raise for it.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    multiplicity = _check_multiplicity(multiplicity)
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu")
        low = values.dtype == torch.float32  # sorted in float32, as _sorted_descending does
        values = values.numpy() if low else values.to(torch.float64).numpy()
    else:
        values = np.asarray(values)
        low = values.dtype == np.float32
        values = values if low else values.astype(np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"values must be a non-empty (rows, entries) array, got {values.shape}")
    if not (np.isfinite(values).all() and (values >= 0).all()):
        for row in values:  # the first bad row raises the per-row error
            _check_entries(row, multiplicity)
    rows = np.arange(values.shape[0])
    ordered = np.sort(values, axis=1)[:, ::-1].astype(np.float64)  # a contiguous copy
    totals = multiplicity * values.astype(np.float64).sum(axis=1)
    # Top-k mean, as _top_k_mean_of_sorted
    k = operator.index(k)
    num_entries = values.shape[1] * multiplicity
    if not 1 <= k <= num_entries:
        raise ValueError(f"k must be in [1, {num_entries}] (the number of entries), got {k}")
    full_blocks, rest = divmod(k, multiplicity)
    top = multiplicity * ordered[:, :full_blocks].sum(axis=1)
    if rest:
        top = top + rest * ordered[:, full_blocks]
    top_k_means = top / k
    # effective rank, as _effective_rank_of_sorted
    block_ends = np.cumsum(multiplicity * ordered, axis=1)
    zero = ordered[:, 0] == 0.0
    threshold = (alpha - EFFECTIVE_RANK_RTOL) * block_ends[:, -1]
    block = (block_ends < threshold[:, None]).sum(axis=1)  # = searchsorted(side="left")
    block = np.where(zero, 0, block)
    before = np.where(block > 0, block_ends[rows, np.maximum(block - 1, 0)], 0.0)
    value = np.where(zero, 1.0, ordered[rows, block])
    copies = np.clip(np.ceil((threshold - before) / value), 1, multiplicity).astype(np.int64)
    while True:  # the division may round either way: settle on the comparison itself
        down = (copies > 1) & (before + (copies - 1) * value >= threshold)
        if not down.any():
            break
        copies -= down
    while True:
        up = (copies < multiplicity) & (before + copies * value < threshold)
        if not up.any():
            break
        copies += up
    effective_ranks = np.where(zero, 0, block * multiplicity + copies)
    return totals, top_k_means, effective_ranks


def make_nonnegative(values: torch.Tensor, mode: str = "abs") -> torch.Tensor:
    """Map a Hessian diagonal that may hold negative entries onto non-negative values.

    Away from a minimum, estimators such as Hutchinson's can return negative ``h_ii``.

    - ``"abs"``: ``|h_ii|``, the size of the loss change ``(1/2) h_ii dw_i^2`` (eq. 7) for a
      perturbation in either direction, whatever its sign.
    - ``"clamp"``: ``max(h_ii, 0)``, negative curvature counted as no sensitivity.

    Returns a tensor of the input's dtype and device; NaN stays NaN (the metrics reject it).
    """
    check_choice("mode", mode, NEGATIVE_MODES)
    values = torch.as_tensor(values)
    return values.abs() if mode == "abs" else values.clamp(min=0)


def as_nonnegative_array(values, name: str) -> np.ndarray:
    """Return per-matrix values (a metric, theta) as a 1-D finite non-negative float64 array;
    ValueError naming ``name`` otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.array(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {array.tolist()}")
    return array


def combination_weight(metric_values, weighting: str = "std") -> float:
    """Weight of one metric in a weighted sum over matrices (eqs. 11 and 13).

    ``metric_values`` holds the metric of every matrix. With ``mu`` its mean and ``sigma`` its
    population standard deviation (``ddof=0``: the matrices are the whole population, not a
    sample of one):

    - ``"std"``: ``sigma / mu^2`` (eqs. 11, 13): ``1/mu`` puts metrics of different scales on
      one scale and ``sigma/mu`` favours the metric that separates the matrices more;
    - ``"equal"``: ``0.5 / mu`` (the equal-weight ablation of Appendix B.1).

    Either way ``weight * metric`` does not change when the metric is scaled by a constant.
    Returns 0.0 when ``mu == 0``: a metric that is zero everywhere carries no information.
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    array = as_nonnegative_array(metric_values, "metric_values")
    mu = float(array.mean())
    if mu == 0.0:
        return 0.0
    if weighting == "equal":
        return 0.5 / mu
    return float(array.std(ddof=0)) / mu**2


@dataclass(frozen=True, eq=False)
class SensitivityScores:
    """Per-matrix scores (read-only float64 arrays, one entry per matrix) and their weights."""

    global_: np.ndarray
    """``S_global`` (eq. 8): the Hessian traces."""
    local: np.ndarray
    """``S_local = beta1 * S_Topk + beta2 * S_EffectiveRank`` (eq. 12)."""
    theta: np.ndarray
    """Rank allocation weight: eq. 14 for ``score="combined"``, else the chosen metric."""
    beta1: float
    """Weight of ``S_Topk`` in ``S_local`` (eq. 11)."""
    beta2: float
    """Weight of ``S_EffectiveRank`` in ``S_local`` (eq. 11)."""
    gamma1: float
    """Weight of ``S_global`` in ``theta`` (eq. 13)."""
    gamma2: float
    """Weight of ``S_local`` in ``theta`` (eq. 13)."""


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float64)
    array.flags.writeable = False
    return array


def sensitivity_scores(
    traces, top_k_means, effective_ranks, *, score: str = "combined", weighting: str = "std"
) -> SensitivityScores:
    """Combine per-matrix metrics into the allocation weight ``theta`` (eqs. 11-14).

    ``traces``, ``top_k_means`` and ``effective_ranks`` hold one entry per matrix, in the same
    order. ``score`` picks ``theta``: ``"combined"`` (eq. 14, the method), ``"global"``
    (``S_global`` alone, the paper's S_g-LoRA ablation), ``"local"`` (``S_local``),
    ``"topk"`` or ``"effective_rank"`` (a single local metric, as in the paper's Figure 3).
    ``weighting`` is passed to :func:`combination_weight` for all four weights, which are
    reported whatever ``score`` is.
    """
    check_choice("score", score, SCORES)
    global_ = as_nonnegative_array(traces, "traces")
    top_k = as_nonnegative_array(top_k_means, "top_k_means")
    eff_rank = as_nonnegative_array(effective_ranks, "effective_ranks")
    if not global_.size == top_k.size == eff_rank.size:
        raise ValueError(
            "traces, top_k_means and effective_ranks must have one entry per matrix, got "
            f"{global_.size}, {top_k.size} and {eff_rank.size} entries"
        )
    beta1 = combination_weight(top_k, weighting)
    beta2 = combination_weight(eff_rank, weighting)
    local = beta1 * top_k + beta2 * eff_rank  # eq. 12
    gamma1 = combination_weight(global_, weighting)
    gamma2 = combination_weight(local, weighting)
    theta_by_score = {
        "combined": gamma1 * global_ + gamma2 * local,  # eq. 14
        "global": global_,
        "local": local,
        "topk": top_k,
        "effective_rank": eff_rank,
    }
    return SensitivityScores(
        global_=_read_only(global_),
        local=_read_only(local),
        theta=_read_only(theta_by_score[score]),
        beta1=beta1,
        beta2=beta2,
        gamma1=gamma1,
        gamma2=gamma2,
    )
