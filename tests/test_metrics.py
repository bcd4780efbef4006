"""Metrics of senslora.metrics against hand-computed values and naive N-sized references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora.metrics import (
    EFFECTIVE_RANK_RTOL,
    SCORES,
    combination_weight,
    effective_rank,
    make_nonnegative,
    sensitivity_scores,
    top_k_count,
    top_k_mean,
    trace,
)

# --- naive references: materialise all N entries, sort, cumulative sum -------------------------


def _entries(values, multiplicity):
    """All N = multiplicity * len(values) diagonal entries, sorted descending."""
    return np.sort(np.repeat(np.asarray(values, dtype=np.float64), multiplicity))[::-1]


def _naive_top_k_mean(values, multiplicity, k):
    return float(np.sum(_entries(values, multiplicity)[:k])) / k


def _naive_effective_rank(values, multiplicity, alpha):
    partial = np.cumsum(_entries(values, multiplicity))
    if partial.size == 0 or partial[-1] == 0:
        return 0
    threshold = (alpha - EFFECTIVE_RANK_RTOL) * partial[-1]
    return int(np.argmax(partial >= threshold)) + 1


def _tensor(values):
    return torch.tensor(values, dtype=torch.float64)


# --- hand-computed values ---------------------------------------------------------------------


def test_trace_by_hand():
    assert trace(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 10.0
    assert trace(torch.tensor([3.0, 1.0]), multiplicity=2) == 8.0  # entries 3, 3, 1, 1
    assert trace(torch.tensor([])) == 0.0


def test_trace_accepts_any_shape_and_dtype():
    diagonal = torch.tensor([[1.5, 2.0], [0.5, 4.0]], dtype=torch.bfloat16)
    assert trace(diagonal) == 8.0
    assert trace(np.array([1.0, 2.0]), multiplicity=3) == 9.0


@pytest.mark.parametrize(
    ("num_entries", "fraction", "expected"),
    [
        (10, 0.5, 5),
        (7, 0.5, 3),
        (1, 0.5, 1),
        (3, 0.1, 1),
        (300, 1 / 3, 100),
        (100, 0.29, 29),
        (4, 1.0, 4),
    ],
)
def test_top_k_count(num_entries, fraction, expected):
    assert top_k_count(num_entries, fraction) == expected


@pytest.mark.parametrize(("num_entries", "fraction"), [(10, 0.0), (10, 1.5), (10, -0.5), (0, 0.5)])
def test_top_k_count_rejects_bad_arguments(num_entries, fraction):
    with pytest.raises(ValueError):
        top_k_count(num_entries, fraction)


def test_top_k_mean_by_hand():
    values = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert top_k_mean(values, k=1) == 4.0
    assert top_k_mean(values, k=2) == 3.5
    assert top_k_mean(values, k=4) == 2.5
    compact = torch.tensor([3.0, 1.0])  # entries 3, 3, 1, 1
    assert top_k_mean(compact, 2, k=1) == 3.0
    assert top_k_mean(compact, 2, k=3) == pytest.approx(7 / 3, rel=1e-15)  # 3 + 3 + 1
    assert top_k_mean(compact, 2, k=4) == 2.0


@pytest.mark.parametrize("k", [0, 5, -1])
def test_top_k_mean_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        top_k_mean(torch.tensor([3.0, 1.0]), 2, k=k)


def test_effective_rank_by_hand():
    values = torch.tensor([4.0, 1.0, 3.0, 2.0])  # sorted 4, 3, 2, 1; partial sums 4, 7, 9, 10
    assert effective_rank(values, alpha=0.4) == 1
    assert effective_rank(values, alpha=0.41) == 2
    assert effective_rank(values, alpha=0.7) == 2  # exactly 7 of 10
    assert effective_rank(values, alpha=0.85) == 3
    assert effective_rank(values, alpha=1.0) == 4
    compact = torch.tensor([3.0, 1.0])  # entries 3, 3, 1, 1; partial sums 3, 6, 7, 8
    assert effective_rank(compact, 2, alpha=0.375) == 1
    assert effective_rank(compact, 2, alpha=0.75) == 2
    assert effective_rank(compact, 2, alpha=0.8) == 3
    assert effective_rank(compact, 2, alpha=1.0) == 4


def test_effective_rank_exact_fraction_is_not_defeated_by_rounding():
    assert 0.28 * 25 > 7  # float rounding: without the tolerance 8 entries would be needed
    assert effective_rank(torch.ones(25), alpha=0.28) == 7
    assert effective_rank(torch.ones(1), 25, alpha=0.28) == 7
    assert effective_rank(torch.ones(5), 5, alpha=0.28) == 7
    assert effective_rank(torch.full((20,), 2.5), alpha=0.7) == 14


def test_float32_input_gives_the_float64_result():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0)) ** 3
    values[::7] = values[3]  # ties
    for multiplicity in (1, 5):
        assert effective_rank(values, multiplicity) == effective_rank(values.double(), multiplicity)
        k = 1000 * multiplicity // 2 + 1
        assert top_k_mean(values, multiplicity, k=k) == top_k_mean(
            values.double(), multiplicity, k=k
        )


def test_effective_rank_of_zero_diagonal_is_zero():
    assert effective_rank(torch.zeros(5), 3) == 0
    assert effective_rank(torch.tensor([])) == 0


def test_effective_rank_with_zero_entries():
    assert effective_rank(torch.tensor([0.0, 5.0, 0.0]), 4, alpha=1.0) == 4


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.01])
def test_effective_rank_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        effective_rank(torch.ones(3), alpha=alpha)


# --- compact form == naive form ----------------------------------------------------------------

_floats = st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)
_small_ints = st.integers(0, 5).map(float)  # many ties, exact partial sums
_diagonals = st.one_of(
    st.lists(_floats, min_size=1, max_size=30),
    st.lists(_small_ints, min_size=1, max_size=30),
    st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0 / 3, 7.5]), min_size=1, max_size=30),
)
_alphas = st.one_of(
    st.sampled_from([0.1, 0.25, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]),
    st.floats(1e-6, 1.0, exclude_min=False),
)


@settings(max_examples=300, deadline=None)
@given(values=_diagonals, multiplicity=st.integers(1, 7), data=st.data())
def test_top_k_mean_compact_equals_naive(values, multiplicity, data):
    num_entries = len(values) * multiplicity
    k = data.draw(st.integers(1, num_entries), label="k")
    expected = _naive_top_k_mean(values, multiplicity, k)
    assert top_k_mean(_tensor(values), multiplicity, k=k) == pytest.approx(
        expected, rel=1e-12, abs=1e-300
    )


@settings(max_examples=300, deadline=None)
@given(values=_diagonals, multiplicity=st.integers(1, 7), alpha=_alphas)
def test_effective_rank_compact_equals_naive(values, multiplicity, alpha):
    expected = _naive_effective_rank(values, multiplicity, alpha)
    assert effective_rank(_tensor(values), multiplicity, alpha) == expected


@settings(max_examples=100, deadline=None)
@given(values=_diagonals, multiplicity=st.integers(1, 7))
def test_trace_compact_equals_naive(values, multiplicity):
    expected = float(np.sum(_entries(values, multiplicity)))
    assert trace(_tensor(values), multiplicity) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_compact_equals_naive_on_gptq_like_diagonals(seed):
    rng = np.random.default_rng(seed)
    d_in, d_out = rng.integers(1, 40, size=2)
    values = 2 * (rng.standard_normal((64, d_in)) ** 2).sum(axis=0)  # 2 * sum_t x_tj^2
    if seed % 2:
        values[rng.integers(0, d_in, size=d_in // 2)] = values[0]  # ties
    k = top_k_count(int(d_in * d_out), 0.5)
    assert top_k_mean(_tensor(values), int(d_out), k=k) == pytest.approx(
        _naive_top_k_mean(values, d_out, k), rel=1e-12
    )
    for alpha in (0.5, 0.8, 0.85, 0.95, 1.0):
        assert effective_rank(_tensor(values), int(d_out), alpha) == _naive_effective_rank(
            values, d_out, alpha
        )


# --- invalid entries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric",
    [lambda v, m: trace(v, m), lambda v, m: top_k_mean(v, m, k=1), effective_rank],
    ids=["trace", "top_k_mean", "effective_rank"],
)
def test_metrics_reject_negative_and_non_finite_entries(metric):
    with pytest.raises(ValueError, match="got 6 negative entries .*use make_nonnegative"):
        metric(torch.tensor([-1.0, 2.0, -0.5]), 3)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            metric(torch.tensor([1.0, bad]), 1)
    with pytest.raises(ValueError, match="multiplicity"):
        metric(torch.tensor([1.0]), 0)


def test_negative_zero_is_not_negative():
    assert trace(torch.tensor([-0.0, 1.0])) == 1.0


def test_make_nonnegative_modes():
    values = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float32)
    absolute = make_nonnegative(values)
    assert torch.equal(absolute, torch.tensor([2.0, 0.0, 3.0]))
    assert absolute.dtype == torch.float32
    assert torch.equal(make_nonnegative(values, "abs"), absolute)
    assert torch.equal(make_nonnegative(values, "clamp"), torch.tensor([0.0, 0.0, 3.0]))
    assert trace(make_nonnegative(values, "abs")) == 5.0
    assert trace(make_nonnegative(values, "clamp")) == 3.0
    assert torch.equal(values, torch.tensor([-2.0, 0.0, 3.0]))  # input untouched


def test_make_nonnegative_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'abs', 'clamp'"):
        make_nonnegative(torch.tensor([1.0]), "square")


# --- weights and scores -----------------------------------------------------------------------


def test_combination_weight_by_hand():
    # [1, 2, 3]: mu = 2, population sigma = sqrt(2/3)
    assert combination_weight([1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(2 / 3) / 4, rel=1e-15)
    assert combination_weight([1.0, 2.0, 3.0], "equal") == 0.25
    # [2, 2, 8]: mu = 4, sigma = sqrt((4 + 4 + 16) / 3) = sqrt(8)
    assert combination_weight(np.array([2, 2, 8])) == pytest.approx(math.sqrt(8) / 16, rel=1e-15)
    assert combination_weight(torch.tensor([2.0, 2.0, 8.0]), "equal") == 0.125
    assert combination_weight([5.0, 5.0]) == 0.0  # no spread


@pytest.mark.parametrize("weighting", ["std", "equal"])
def test_combination_weight_of_zero_mean_is_zero(weighting):
    assert combination_weight([0.0, 0.0, 0.0], weighting) == 0.0


def test_combination_weight_rejects_bad_input():
    with pytest.raises(ValueError, match="'std', 'equal'"):
        combination_weight([1.0, 2.0], "median")
    for bad in ([], [1.0, -1.0], [1.0, math.nan], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            combination_weight(bad)


def test_sensitivity_scores_std_by_hand():
    # effective ranks constant: sigma = 0 so beta2 = 0; local = beta1 * topk with
    # beta1 = sqrt(8) / 16 = sqrt(2) / 8, so local = sqrt(2) * [1/4, 1/4, 1] and
    # gamma2 = sigma_l / mu_l^2 = 1 / beta1 * beta1 = 1 (weights scale as 1 / c).
    scores = sensitivity_scores([1.0, 2.0, 3.0], [2.0, 2.0, 8.0], [4, 4, 4])
    b = math.sqrt(2) / 8
    g = math.sqrt(2 / 3) / 4
    assert scores.beta1 == pytest.approx(b, rel=1e-15)
    assert scores.beta2 == 0.0
    assert scores.gamma1 == pytest.approx(g, rel=1e-15)
    assert scores.gamma2 == pytest.approx(1.0, rel=1e-14)
    np.testing.assert_allclose(scores.global_, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(scores.local, math.sqrt(2) * np.array([0.25, 0.25, 1.0]))
    expected = [g + math.sqrt(2) / 4, 2 * g + math.sqrt(2) / 4, 3 * g + math.sqrt(2)]
    np.testing.assert_allclose(scores.theta, expected, rtol=1e-14)
    np.testing.assert_allclose(scores.theta, [0.557678, 0.761802, 2.026586], atol=1e-6)


def test_sensitivity_scores_equal_by_hand():
    # beta1 = 0.5/4, beta2 = 0.5/2, so local = [0.5, 0.75, 1.75] (mean 1) and gamma2 = 0.5;
    # gamma1 = 0.5/2: theta = 0.25 * [1, 2, 3] + 0.5 * local
    scores = sensitivity_scores([1, 2, 3], [2, 2, 8], [1, 2, 3], weighting="equal")
    assert (scores.beta1, scores.beta2, scores.gamma1, scores.gamma2) == (0.125, 0.25, 0.25, 0.5)
    np.testing.assert_allclose(scores.local, [0.5, 0.75, 1.75], rtol=1e-15)
    np.testing.assert_allclose(scores.theta, [0.5, 0.875, 1.625], rtol=1e-15)


def test_sensitivity_scores_variants():
    traces, top_k, eff_rank = [1.0, 2.0, 3.0], [2.0, 2.0, 8.0], [1.0, 2.0, 3.0]
    combined = sensitivity_scores(traces, top_k, eff_rank)
    expected = {
        "global": traces,
        "local": combined.local,
        "topk": top_k,
        "effective_rank": eff_rank,
        "combined": combined.gamma1 * np.array(traces) + combined.gamma2 * combined.local,
    }
    assert set(expected) == set(SCORES)
    for score, theta in expected.items():
        scores = sensitivity_scores(traces, top_k, eff_rank, score=score)
        np.testing.assert_allclose(scores.theta, theta, rtol=1e-15)
        assert scores.gamma1 == combined.gamma1  # the weights are reported whatever theta is


def test_sensitivity_scores_are_read_only():
    scores = sensitivity_scores([1.0, 2.0], [1.0, 3.0], [1, 2])
    with pytest.raises(ValueError):
        scores.theta[0] = 5.0


def test_sensitivity_scores_reject_bad_input():
    with pytest.raises(ValueError, match="'combined', 'global', 'local', 'topk'"):
        sensitivity_scores([1.0], [1.0], [1.0], score="trace")
    with pytest.raises(ValueError, match="one entry per matrix"):
        sensitivity_scores([1.0, 2.0], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="traces"):
        sensitivity_scores([1.0, -2.0], [1.0, 1.0], [1.0, 2.0])


@pytest.mark.parametrize("weighting", ["std", "equal"])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e4])
def test_theta_is_invariant_to_the_scale_of_a_metric(weighting, which, factor):
    rng = np.random.default_rng(which)
    metrics = [rng.uniform(0.1, 10.0, size=12) for _ in range(3)]
    scaled = [m * factor if i == which else m for i, m in enumerate(metrics)]
    base = sensitivity_scores(*metrics, weighting=weighting)
    other = sensitivity_scores(*scaled, weighting=weighting)
    np.testing.assert_allclose(other.theta, base.theta, rtol=1e-12)
    np.testing.assert_array_equal(np.argsort(other.theta), np.argsort(base.theta))
    weight_names = ["gamma1", "beta1", "beta2"]  # weight of traces, top-k, effective rank
    assert getattr(other, weight_names[which]) == pytest.approx(
        getattr(base, weight_names[which]) / factor, rel=1e-12
    )
