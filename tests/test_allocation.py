"""Rank allocation (SRA, PRA): hand-computed cases and hypothesis properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora.rank_schemes import progressive_rank_allocation, scaled_rank_allocation

_theta_values = st.one_of(
    st.integers(0, 10).map(float),  # ties and zeros
    st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@st.composite
def _problems(draw, with_costs: bool, distinct: bool = False):
    """(theta, min_ranks, max_ranks, costs, budget) with a feasible budget."""
    n = draw(st.integers(1, 12))
    theta = draw(st.lists(_theta_values, min_size=n, max_size=n, unique=distinct))
    low = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    high = low + np.array(draw(st.lists(st.integers(0, 8), min_size=n, max_size=n)))
    if with_costs:
        cost = np.array(draw(st.lists(st.sampled_from([1, 3, 5, 8]), min_size=n, max_size=n)))
        lowest, highest = int(low @ cost), int(high @ cost) + 10
    else:
        cost = None
        lowest, highest = int(low.sum()), int(high.sum())
    budget = draw(st.integers(lowest, highest))
    return theta, low.tolist(), high.tolist(), None if cost is None else cost.tolist(), budget


def _allocate(problem):
    theta, low, high, cost, budget = problem
    return scaled_rank_allocation(theta, budget, min_ranks=low, max_ranks=high, costs=cost)


# --- SRA: properties ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(problem=_problems(with_costs=False))
def test_sra_meets_budget_exactly_within_bounds(problem):
    _, low, high, _, budget = problem
    ranks = _allocate(problem)
    assert all(isinstance(r, int) for r in ranks)
    assert sum(ranks) == budget
    assert all(lo <= r <= hi for lo, r, hi in zip(low, ranks, high, strict=True))


@settings(max_examples=200, deadline=None)
@given(problem=_problems(with_costs=True))
def test_sra_with_costs_never_exceeds_budget_and_no_unit_fits(problem):
    _, low, high, cost, budget = problem
    ranks = _allocate(problem)
    assert all(lo <= r <= hi for lo, r, hi in zip(low, ranks, high, strict=True))
    left = budget - sum(r * c for r, c in zip(ranks, cost, strict=True))
    assert left >= 0
    assert all(r == hi or c > left for r, hi, c in zip(ranks, high, cost, strict=True))


def _assert_monotone(problem, ranks):
    theta, low, high, cost, _ = problem
    cost = cost or [1] * len(theta)
    for i in range(len(theta)):
        for j in range(len(theta)):
            same = (low[i], high[i], cost[i]) == (low[j], high[j], cost[j])
            if same and theta[i] > theta[j]:
                assert ranks[i] >= ranks[j], (i, j)


@settings(max_examples=200, deadline=None)
@given(problem=st.one_of(_problems(with_costs=False), _problems(with_costs=True)))
def test_sra_higher_theta_never_gets_lower_rank(problem):
    _assert_monotone(problem, _allocate(problem))


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 12),
    theta=st.lists(_theta_values, min_size=12, max_size=12),
    data=st.data(),
)
def test_sra_monotone_with_shared_bounds(n, theta, data):
    theta = theta[:n]
    low = data.draw(st.integers(0, 2), label="low")
    high = low + data.draw(st.integers(0, 8), label="span")
    budget = data.draw(st.integers(low * n, high * n), label="budget")
    ranks = scaled_rank_allocation(theta, budget, min_ranks=low, max_ranks=high)
    assert sum(ranks) == budget
    for i in range(n):
        for j in range(n):
            assert theta[i] <= theta[j] or ranks[i] >= ranks[j], (i, j)


@settings(max_examples=200, deadline=None)
@given(problem=st.one_of(_problems(with_costs=False), _problems(with_costs=True)))
def test_sra_is_deterministic(problem):
    theta, low, high, cost, budget = problem
    first = _allocate(problem)
    assert _allocate(problem) == first
    as_arrays = scaled_rank_allocation(
        torch.tensor(theta, dtype=torch.float64),
        np.int64(budget),
        min_ranks=np.array(low),
        max_ranks=torch.tensor(high),
        costs=None if cost is None else np.array(cost),
    )
    assert as_arrays == first


@settings(max_examples=200, deadline=None)
@given(
    problem=st.one_of(
        _problems(with_costs=False, distinct=True), _problems(with_costs=True, distinct=True)
    ),
    data=st.data(),
)
def test_sra_is_permutation_equivariant(problem, data):
    theta, low, high, cost, budget = problem
    perm = data.draw(st.permutations(range(len(theta))), label="permutation")

    def permuted(values):
        return None if values is None else [values[p] for p in perm]

    ranks = _allocate(problem)
    moved = _allocate((permuted(theta), permuted(low), permuted(high), permuted(cost), budget))
    assert moved == permuted(ranks)


# --- SRA: hand-computed cases -------------------------------------------------------------------


def test_sra_proportional_when_no_bound_binds():
    assert scaled_rank_allocation([1, 2, 3, 4], 20, min_ranks=0, max_ranks=64) == [2, 4, 6, 8]
    ranks = scaled_rank_allocation([0.1, 0.2, 0.3, 0.4], 20, min_ranks=0, max_ranks=64)
    assert ranks == [2, 4, 6, 8]


def test_sra_redistributes_the_surplus_of_capped_matrices():
    # 10 * lam is capped at 6; 6 + 2 * lam = 12 gives lam = 3
    assert scaled_rank_allocation([10, 1, 1], 12, min_ranks=0, max_ranks=6) == [6, 3, 3]
    assert scaled_rank_allocation([10, 2, 1], 12, min_ranks=0, max_ranks=6) == [6, 4, 2]


def test_sra_min_ranks_raise_small_theta():
    # lam * [8, 1, 1] with min 2: 8 * lam + 2 + 2 = 12 gives lam = 1
    assert scaled_rank_allocation([8, 1, 1], 12, min_ranks=2, max_ranks=12) == [8, 2, 2]


def test_sra_rounds_by_largest_fraction_then_theta_then_index():
    # lam = 7/12: [1.75, 2.33, 2.92] -> floors [1, 2, 2]; the two units left go to the
    # largest fractions, 0.92 then 0.75
    assert scaled_rank_allocation([3, 4, 5], 7, min_ranks=0, max_ranks=9) == [2, 2, 3]
    # equal fractions 0.5: the larger theta wins, whichever its position
    assert scaled_rank_allocation([1, 3], 2, min_ranks=0, max_ranks=9) == [0, 2]
    assert scaled_rank_allocation([3, 1], 2, min_ranks=0, max_ranks=9) == [2, 0]
    # the same ties where float noise in lam would otherwise decide: [4.5, 1.5], [3.5, 0.5]
    assert scaled_rank_allocation([0.3, 0.1], 6, min_ranks=0, max_ranks=9) == [5, 1]
    assert scaled_rank_allocation([0.7, 0.1], 4, min_ranks=0, max_ranks=9) == [4, 0]
    assert scaled_rank_allocation([0.1, 0.7, 0.2], 8, min_ranks=0, max_ranks=9) == [1, 6, 1]
    # equal theta: the lower index wins
    assert scaled_rank_allocation([1, 1, 1], 4, min_ranks=0, max_ranks=9) == [2, 1, 1]


def test_sra_zero_theta_gets_units_once_the_others_are_capped():
    assert scaled_rank_allocation([5, 0, 0], 10, min_ranks=0, max_ranks=4) == [4, 3, 3]
    assert scaled_rank_allocation([5, 0, 0], 4, min_ranks=0, max_ranks=4) == [4, 0, 0]


def test_sra_all_zero_theta_splits_uniformly():
    assert scaled_rank_allocation([0, 0, 0], 7, min_ranks=0, max_ranks=6) == [3, 2, 2]
    assert scaled_rank_allocation([0, 0, 0], 9, min_ranks=0, max_ranks=[1, 6, 6]) == [1, 4, 4]


def test_sra_with_costs_by_hand():
    # lam * (1 + 3) = 9: continuous [2.25, 2.25] -> [2, 2] costs 8; the tie goes to index 0
    assert scaled_rank_allocation([1, 1], 9, min_ranks=0, max_ranks=10, costs=[1, 3]) == [3, 2]
    # lam * (4 + 1) = 9: [1.8, 1.8] -> [1, 1] costs 5; +1 to index 0 (cost 4) fills the budget
    assert scaled_rank_allocation([1, 1], 9, min_ranks=0, max_ranks=10, costs=[4, 1]) == [2, 1]
    # uniform LoRA of rank 4 on two 8x8 and one 8x24 matrices: 4 * (16 + 16 + 32) = 256
    ranks = scaled_rank_allocation([1, 1, 1], 256, min_ranks=0, max_ranks=8, costs=[16, 16, 32])
    assert ranks == [4, 4, 4]


def test_sra_with_costs_gives_everyone_max_when_budget_is_ample():
    assert scaled_rank_allocation([1, 2], 1000, min_ranks=0, max_ranks=3, costs=[5, 7]) == [3, 3]


def test_sra_survives_extreme_theta_ratios():
    assert scaled_rank_allocation([1.0, 5e-324], 7, min_ranks=0, max_ranks=5) == [5, 2]
    assert scaled_rank_allocation([1e300, 1.0], 7, min_ranks=0, max_ranks=5) == [5, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(theta=[1, 1], budget=3, min_ranks=2, max_ranks=4), "min_ranks cost 4"),
        (dict(theta=[1, 1], budget=9, min_ranks=0, max_ranks=4), "sum to 8 < budget 9"),
        (dict(theta=[1, 1], budget=5, min_ranks=0, max_ranks=4, costs=[3, 4]), None),
        (dict(theta=[1, 1], budget=6, min_ranks=1, max_ranks=4, costs=[3, 4]), "cost 7"),
        (dict(theta=[1, 1], budget=4, min_ranks=[0, 3], max_ranks=[4, 2]), "matrices \\[1\\]"),
        (dict(theta=[1, -1], budget=4, min_ranks=0, max_ranks=4), "non-negative"),
        (dict(theta=[1, float("nan")], budget=4, min_ranks=0, max_ranks=4), "finite"),
        (dict(theta=[1, float("inf")], budget=4, min_ranks=0, max_ranks=4), "finite"),
        (dict(theta=[], budget=0, min_ranks=0, max_ranks=4), "non-empty"),
        (dict(theta=[1, 1], budget=4, min_ranks=0, max_ranks=[4, 4, 4]), "one entry"),
        (dict(theta=[1, 1], budget=4, min_ranks=-1, max_ranks=4), ">= 0"),
        (dict(theta=[1, 1], budget=4, min_ranks=0, max_ranks=4.5), "ints"),
        (dict(theta=[1, 1], budget=4, min_ranks=0, max_ranks=4, costs=[1, 0]), "costs"),
    ],
)
def test_sra_rejects_invalid_problems(kwargs, match):
    theta = kwargs.pop("theta")
    budget = kwargs.pop("budget")
    if match is None:  # feasible: costs only bound from above
        assert scaled_rank_allocation(theta, budget, **kwargs) == [1, 0]
        return
    with pytest.raises(ValueError, match=match):
        scaled_rank_allocation(theta, budget, **kwargs)


# --- PRA ---------------------------------------------------------------------------------------


def test_pra_reproduces_the_paper_example():
    theta = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert progressive_rank_allocation(theta, 5, min_ranks=0, max_ranks=16) == [6, 6, 5, 5, 4, 4]
    shuffled = [3.0, 6.0, 1.0, 5.0, 2.0, 4.0]
    ranks = progressive_rank_allocation(shuffled, 5, min_ranks=0, max_ranks=16)
    assert ranks == [5, 6, 4, 6, 4, 5]


def test_pra_levels_and_budget_correction():
    # 7 matrices in groups of 3, 2, 2 at levels 6, 5, 4 sum to 36: the lowest theta gives one
    ranks = progressive_rank_allocation(list(range(7, 0, -1)), 5, min_ranks=0, max_ranks=16)
    assert ranks == [6, 6, 6, 5, 5, 4, 3]
    # even number of categories with an even step: levels 5 + 3, 5 + 1, 5 - 1, 5 - 3
    assert progressive_rank_allocation(
        [4, 3, 2, 1], 5, num_categories=4, step=2, min_ranks=0, max_ranks=16
    ) == [8, 6, 4, 2]
    # a cap at 7 pushes the surplus to the next matrices in descending theta order
    assert progressive_rank_allocation(
        [4, 3, 2, 1], 5, num_categories=4, step=2, min_ranks=0, max_ranks=7
    ) == [7, 7, 4, 2]
    # a floor at 3 takes ranks back from the lowest theta first
    assert progressive_rank_allocation(
        [4, 3, 2, 1], 5, num_categories=4, step=2, min_ranks=3, max_ranks=16
    ) == [8, 6, 3, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_categories=2, step=1), "not integers"),
        (dict(num_categories=4, step=3), "not integers"),
        (dict(min_ranks=6), "min_ranks sum to 36"),
        (dict(max_ranks=4), "max_ranks to 24"),
        (dict(num_categories=0), "num_categories"),
        (dict(step=-1), "step"),
    ],
)
def test_pra_rejects_invalid_problems(kwargs, match):
    arguments = dict(min_ranks=0, max_ranks=16) | kwargs
    with pytest.raises(ValueError, match=match):
        progressive_rank_allocation([6, 5, 4, 3, 2, 1], 5, **arguments)


@settings(max_examples=200, deadline=None)
@given(
    theta=st.lists(_theta_values, min_size=1, max_size=30),
    avg_rank=st.integers(0, 10),
    num_categories=st.integers(1, 6),
    step=st.integers(0, 4),
    data=st.data(),
)
def test_pra_keeps_the_exact_budget_within_bounds(theta, avg_rank, num_categories, step, data):
    if step * (num_categories - 1) % 2:
        step += 1
    n = len(theta)
    low = data.draw(st.lists(st.integers(0, avg_rank), min_size=n, max_size=n), label="low")
    high = data.draw(st.lists(st.integers(avg_rank, 20), min_size=n, max_size=n), label="high")
    ranks = progressive_rank_allocation(
        theta, avg_rank, num_categories=num_categories, step=step, min_ranks=low, max_ranks=high
    )
    assert sum(ranks) == avg_rank * n
    assert all(lo <= r <= hi for lo, r, hi in zip(low, ranks, high, strict=True))
    shared = progressive_rank_allocation(
        theta, avg_rank, num_categories=num_categories, step=step, min_ranks=0, max_ranks=20
    )
    assert sum(shared) == avg_rank * n
    by_theta = [shared[i] for i in sorted(range(n), key=lambda i: (-theta[i], i))]
    assert by_theta == sorted(by_theta, reverse=True)  # higher theta, rank at least as high
