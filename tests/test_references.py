"""The maths against references that share no code with it: the metrics on the explicitly
expanded diagonal in exact arithmetic, SRA against the continuous shares of eq. 15, PRA against
its definition written out position by position, the eigenvalue spectrum against the autograd
Hessian of the layer-wise loss, and theta against eqs. 11-14 computed by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from senslora import AllocationConfig, allocate_ranks, collect_statistics, metrics
from senslora.allocation import module_metrics
from senslora.rank_schemes import progressive_rank_allocation, scaled_rank_allocation
from senslora.stats import ModuleStats
from senslora.targets import LayerShape

# ---------------------------------------------------------------------------------------
# metrics (eqs. 8-10) on the expanded diagonal


def naive_metrics(values: list[float], multiplicity: int, k: int, alpha: float):
    """Trace, Top-k mean and effective rank of the N = len(values) * multiplicity entries,
    expanded one by one, summed exactly (fractions); a partial sum within 1e-9 of the trace
    below alpha * trace counts as reaching it (documented in `metrics.EFFECTIVE_RANK_RTOL`)."""
    entries = sorted((Fraction(v) for v in values for _ in range(multiplicity)), reverse=True)
    total = sum(entries, Fraction(0))
    top_k = sum(entries[:k], Fraction(0)) / k
    if total == 0:
        return float(total), float(top_k), 0
    threshold = (Fraction(alpha) - Fraction(1e-9)) * total
    partial = Fraction(0)
    for count, entry in enumerate(entries, start=1):
        partial += entry
        if partial >= threshold:
            return float(total), float(top_k), count
    raise AssertionError("the partial sums never reached the threshold")


_entries = st.one_of(st.just(0.0), st.sampled_from([1.0, 3.0]), st.floats(0.0, 1e6))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(_entries, min_size=1, max_size=30),
    multiplicity=st.integers(1, 6),
    fraction=st.sampled_from([0.5, 1 / 3, 1.0, 0.01]),
    alpha=st.sampled_from([0.85, 0.5, 1.0, 0.999, 0.3]),
    float32=st.booleans(),
)
def test_metrics_equal_the_expanded_diagonal(values, multiplicity, fraction, alpha, float32):
    tensor = torch.tensor(values, dtype=torch.float32 if float32 else torch.float64)
    k = metrics.top_k_count(tensor.numel() * multiplicity, fraction)
    trace, top_k, effective = naive_metrics(tensor.tolist(), multiplicity, k, alpha)
    one = metrics.spectrum_metrics(tensor, multiplicity, k=k, alpha=alpha)
    rows = metrics.spectrum_metrics_rows(tensor[None], multiplicity, k=k, alpha=alpha)
    for got in (one, tuple(float(r[0]) for r in rows)):
        assert got[0] == pytest.approx(trace, rel=1e-12, abs=0)
        assert got[1] == pytest.approx(top_k, rel=1e-12, abs=0)
        assert got[2] == effective
    assert metrics.effective_rank(tensor, multiplicity, alpha=alpha) == effective


def test_top_k_count_is_the_rounded_fraction_of_the_entries():
    """k = N/2 in the paper; at least 1, at most N."""
    assert metrics.top_k_count(10, 0.5) == 5
    assert metrics.top_k_count(3, 0.01) == 1
    assert metrics.top_k_count(7, 1.0) == 7


# ---------------------------------------------------------------------------------------
# SRA (eq. 15)


@settings(max_examples=300, deadline=None)
@given(
    theta=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e6)), min_size=1, max_size=12),
    budget=st.integers(0, 60),
)
def test_sra_ranks_are_the_floor_or_ceiling_of_their_share(theta, budget):
    """With no bound binding (min 0, max the whole budget) rank_i is floor or ceil of
    budget * theta_i / sum(theta), the ranks sum to the budget, and the units above the floor
    go to the largest fractional parts (largest remainder)."""
    assume(any(theta))
    ranks = scaled_rank_allocation(theta, budget, min_ranks=0, max_ranks=budget)
    total = sum(Fraction(t) for t in theta)
    shares = [budget * Fraction(t) / total for t in theta]
    assert sum(ranks) == budget
    tol = Fraction(1, 10**8)  # the allocator settles shares within 1e-9 of an integer upward
    for rank, share in zip(ranks, shares, strict=True):
        assert math.floor(share - tol) <= rank <= math.ceil(share + tol), (rank, float(share))
    rounded_up = [s - math.floor(s) for r, s in zip(ranks, shares, strict=True) if r > s + tol]
    rounded_down = [s - math.floor(s) for r, s in zip(ranks, shares, strict=True) if r < s - tol]
    if rounded_up and rounded_down:
        assert min(rounded_up) >= max(rounded_down) - tol


def test_sra_paper_proportions():
    """theta 1 : 2 : 5 with a budget of 16: exactly 2, 4, 10."""
    assert scaled_rank_allocation([1.0, 2.0, 5.0], 16, min_ranks=0, max_ranks=16) == [2, 4, 10]


# ---------------------------------------------------------------------------------------
# PRA (Section 4.4)


def pra_reference(theta, avg_rank, categories, step, low, high):
    """PRA written out from its definition, position by position in descending theta order."""
    n = len(theta)
    order = sorted(range(n), key=lambda i: (-theta[i], i))
    size, extra = divmod(n, categories)
    bounds, start = [], 0
    for c in range(categories):  # earlier groups take one more while extras remain
        start += size + (1 if c < extra else 0)
        bounds.append(start)
    ranks = [0] * n
    for position, i in enumerate(order):
        group = next(c for c, end in enumerate(bounds) if position < end)
        level = avg_rank + Fraction(step * (categories - 1), 2) - step * group
        ranks[i] = min(max(int(level), low[i]), high[i])
    target = avg_rank * n
    while sum(ranks) > target:  # take from the least sensitive first, one each per round
        for i in reversed(order):
            if sum(ranks) > target and ranks[i] > low[i]:
                ranks[i] -= 1
    while sum(ranks) < target:
        for i in order:
            if sum(ranks) < target and ranks[i] < high[i]:
                ranks[i] += 1
    return ranks


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 12), avg_rank=st.integers(0, 8))
def test_pra_equals_its_definition(data, n, avg_rank):
    categories = data.draw(st.integers(1, 5))
    step = data.draw(st.integers(0, 3).filter(lambda s: s * (categories - 1) % 2 == 0))
    theta = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 0.5, 7.0]), min_size=n, max_size=n))
    low = data.draw(st.lists(st.integers(0, avg_rank), min_size=n, max_size=n))
    high = [lo + data.draw(st.integers(0, 6)) for lo in low]
    assume(sum(low) <= avg_rank * n <= sum(high))
    got = progressive_rank_allocation(
        theta, avg_rank, num_categories=categories, step=step, min_ranks=low, max_ranks=high
    )
    assert got == pra_reference(theta, avg_rank, categories, step, low, high)


def test_pra_unbounded_levels_are_exact():
    """9 matrices, 3 categories, step 2, average 5: three of each of 7, 5, 3 by theta order."""
    theta = [0.1, 9.0, 4.0, 0.2, 8.0, 5.0, 0.3, 7.0, 6.0]
    got = progressive_rank_allocation(theta, 5, step=2, min_ranks=0, max_ranks=20)
    assert got == [3, 7, 5, 3, 7, 5, 3, 7, 5]


# ---------------------------------------------------------------------------------------
# eigenvalue spectrum of the activation Hessian


def test_eigenvalue_spectrum_equals_the_autograd_hessian():
    """For y = W x with the layer-wise loss sum ||W x_t||^2 the Hessian in W (d_out*d_in square)
    is I ⊗ 2XXᵀ: its eigenvalues, each counted once, are the spectrum the allocator ranks."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=False).double()
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(3, 2).double())
    inputs = [(torch.randn(2, 4, 5, dtype=torch.float64) * torch.tensor([3, 1, 1, 0.1, 0]),)]
    stats = collect_statistics(model, inputs, targets=["0"], keep_gram=True)["0"]
    x = inputs[0][0].reshape(-1, 5)

    def loss(weight):
        return (x @ weight.T).square().sum()

    hessian = torch.autograd.functional.hessian(loss, layer.weight.detach().clone())
    hessian = hessian.reshape(15, 15)
    expected = np.sort(np.linalg.eigvalsh(hessian.numpy()))[::-1]
    values, multiplicity = stats.spectrum("eigenvalues")
    got = np.sort(np.repeat(values.numpy(), multiplicity))[::-1]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    diagonal, mult = stats.spectrum("diagonal")  # the Hessian's diagonal, column by column
    np.testing.assert_allclose(
        np.repeat(diagonal.numpy()[None], mult, 0).ravel(), np.diag(hessian.numpy()), rtol=1e-6
    )
    alpha = 0.9
    clamped = np.clip(expected, 0, None).tolist()
    table = module_metrics(
        {"0": stats}, AllocationConfig(spectrum="eigenvalues", effective_rank_threshold=alpha)
    )
    assert table["0"]["effective_rank"] == naive_metrics(clamped, 1, 1, alpha)[2]
    assert table["0"]["effective_rank"] < 15  # the spectrum is uneven, so this says something


# ---------------------------------------------------------------------------------------
# theta, eqs. 11-14


def test_theta_equals_equations_11_to_14_by_hand():
    values = {
        "a": [4.0, 0.0, 1.0, 1.0],
        "b": [2.0, 2.0, 2.0, 2.0],
        "c": [9.0, 0.5, 0.0, 0.0],
    }
    stats = {
        n: ModuleStats(
            n, LayerShape(2, 4, False), "activation", column_values=torch.tensor(v), num_tokens=1
        )
        for n, v in values.items()
    }
    allocation = allocate_ranks(stats, AllocationConfig(avg_rank=1, min_rank=0))

    def weight(column):  # eqs. 11 / 13: sigma / mu^2, population sigma
        column = np.asarray(column, dtype=np.float64)
        return column.std() / column.mean() ** 2

    traces = [2 * sum(v) for v in values.values()]  # each column value counts d_out = 2 times
    top_k = [2 * sum(sorted(v, reverse=True)[:2]) / 4 for v in values.values()]  # k = 8/2 = 4
    effective = [naive_metrics(v, 2, 4, 0.85)[2] for v in values.values()]
    local = weight(top_k) * np.array(top_k) + weight(effective) * np.array(effective)
    theta = weight(traces) * np.array(traces) + weight(local) * local
    got = [allocation.metrics[n]["theta"] for n in values]
    np.testing.assert_allclose(got, theta, rtol=1e-12)
    np.testing.assert_allclose([allocation.metrics[n]["s_local"] for n in values], local)
    assert allocation.ranks == dict(
        zip(values, scaled_rank_allocation(theta, 3, min_ranks=0, max_ranks=2), strict=True)
    )
