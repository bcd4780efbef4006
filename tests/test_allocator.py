"""Statistics -> Allocation: budgets, schemes, negative curvature, eigenvalue spectrum."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, token_batches

from senslora import AllocationConfig, allocate_ranks, collect_statistics, metrics
from senslora.allocation import module_metrics
from senslora.stats import ModuleStats
from senslora.targets import LayerShape


@pytest.fixture(scope="module")
def bert_stats():
    return collect_statistics(tiny_bert(), token_batches(num_batches=2), keep_gram=True)


def test_rank_budget_is_exact_and_bounded(bert_stats):
    allocation = allocate_ranks(bert_stats, AllocationConfig(avg_rank=3))
    assert allocation.total_rank == 3 * len(bert_stats)
    for name, rank in allocation.ranks.items():
        assert 1 <= rank <= min(allocation.shapes[name])
    same_shape = [n for n in allocation.ranks if allocation.shapes[n] == (16, 16)]
    theta = {n: allocation.metrics[n]["theta"] for n in same_shape}
    for a in same_shape:
        for b in same_shape:
            if theta[a] > theta[b]:
                assert allocation.ranks[a] >= allocation.ranks[b], (a, b)


def test_parameter_budget_never_exceeds_uniform_lora(bert_stats):
    by_params = allocate_ranks(bert_stats, AllocationConfig(avg_rank=4, budget="parameters"))
    uniform = by_params.uniform_parameters()
    assert by_params.num_parameters <= uniform
    smallest_cost = min(sum(shape) for shape in by_params.shapes.values())
    assert uniform - by_params.num_parameters < smallest_cost


def test_pra_gives_levels_around_the_average(bert_stats):
    allocation = allocate_ranks(bert_stats, AllocationConfig(avg_rank=4, scheme="pra"))
    assert sorted(set(allocation.ranks.values())) == [3, 4, 5]
    assert allocation.total_rank == 4 * len(bert_stats)


def test_ablation_scores_change_theta(bert_stats):
    combined = allocate_ranks(bert_stats, AllocationConfig())
    glob = allocate_ranks(bert_stats, AllocationConfig(score="global"))
    for name in combined.ranks:
        assert glob.metrics[name]["theta"] == pytest.approx(combined.metrics[name]["trace"])
    # eqs. 11-14 by hand from the per-module metrics, not from the stored weights
    table = [combined.metrics[n] for n in combined.ranks]

    def weight(column):
        column = torch.tensor(column, dtype=torch.float64)
        return float(column.std(correction=0) / column.mean() ** 2)

    top_k = [m["top_k_mean"] for m in table]
    effective = [m["effective_rank"] for m in table]
    beta1, beta2 = weight(top_k), weight(effective)
    local = [beta1 * t + beta2 * e for t, e in zip(top_k, effective, strict=True)]
    gamma1, gamma2 = weight([m["trace"] for m in table]), weight(local)
    for m, s_local in zip(table, local, strict=True):
        assert m["s_local"] == pytest.approx(s_local, rel=1e-12)
        assert m["theta"] == pytest.approx(gamma1 * m["trace"] + gamma2 * s_local, rel=1e-12)


def test_eigenvalue_spectrum_changes_only_the_effective_rank(bert_stats):
    diagonal = module_metrics(bert_stats, AllocationConfig())
    eigen = module_metrics(bert_stats, AllocationConfig(spectrum="eigenvalues"))
    for name in diagonal:
        assert eigen[name]["trace"] == diagonal[name]["trace"]
        assert eigen[name]["top_k_mean"] == diagonal[name]["top_k_mean"]
    assert any(eigen[n]["effective_rank"] != diagonal[n]["effective_rank"] for n in diagonal)


def test_eigenvalues_need_the_gram_matrix():
    stats = collect_statistics(tiny_bert(), token_batches(num_batches=1))
    with pytest.raises(ValueError, match="keep_gram=True"):
        allocate_ranks(stats, AllocationConfig(spectrum="eigenvalues"))


def test_negative_curvature_uses_absolute_value_or_clamp():
    diagonal = torch.tensor([[4.0, -3.0], [-1.0, 2.0]])
    stats = {
        "m": ModuleStats(
            "m", LayerShape(2, 2, False), "hutchinson", diagonal=diagonal, num_tokens=1
        )
    }
    absolute = module_metrics(stats, AllocationConfig(negative="abs"))["m"]
    clamped = module_metrics(stats, AllocationConfig(negative="clamp"))["m"]
    assert absolute["trace"] == 10.0 and clamped["trace"] == 6.0
    assert absolute["top_k_mean"] == 3.5 and clamped["top_k_mean"] == 3.0
    assert absolute["effective_rank"] == 3 and clamped["effective_rank"] == 2


@pytest.mark.parametrize("negative", ["abs", "clamp"])
def test_metrics_by_shape_equal_the_metrics_module_by_module(bert_stats, negative):
    """The grouped path (one NumPy pass per column-value shape) against `spectrum_metrics` on
    every module alone, with a gradient-estimator module (full diagonal) mixed in."""
    stats = dict(bert_stats)
    diagonal = torch.tensor([[4.0, -3.0, 0.5], [-1.0, 2.0, 0.0]])
    stats["grad"] = ModuleStats(
        "grad", LayerShape(3, 2, False), "hutchinson", diagonal=diagonal, num_tokens=1
    )
    config = AllocationConfig(negative=negative)
    table = module_metrics(stats, config)
    assert list(table) == list(stats)  # model order kept
    for name, s in stats.items():
        values, multiplicity = s.spectrum("diagonal")
        values = metrics.make_nonnegative(values, negative)
        k = metrics.top_k_count(s.num_entries, config.top_k_fraction)
        expected = metrics.spectrum_metrics(values, multiplicity, k=k, alpha=0.85)
        got = table[name]
        assert (got["trace"], got["top_k_mean"], got["effective_rank"]) == expected


def test_conv1d_model_allocates(gpt2):
    stats = collect_statistics(gpt2, token_batches(num_batches=1))
    allocation = allocate_ranks(stats, AllocationConfig(avg_rank=2))
    assert allocation.shapes["transformer.h.0.attn.c_attn"] == (48, 16)
    assert "lm_head" not in allocation.ranks


def test_infeasible_budgets_are_clear_errors(bert_stats):
    with pytest.raises(ValueError, match="min_rank must not exceed avg_rank"):
        AllocationConfig(avg_rank=2, min_rank=3)
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks(bert_stats, AllocationConfig(avg_rank=20, max_rank=20, budget="rank"))


def test_same_statistics_give_the_same_allocation(bert_stats):
    a = allocate_ranks(bert_stats, AllocationConfig())
    b = allocate_ranks(dict(bert_stats), dataclasses.replace(AllocationConfig()))
    assert a.ranks == b.ranks and a.metrics == b.metrics


def test_same_seed_and_data_are_bit_identical():
    a = collect_statistics(tiny_gpt2(), token_batches(num_batches=2))
    b = collect_statistics(tiny_gpt2(), token_batches(num_batches=2))
    assert all(torch.equal(a[n].column_values, b[n].column_values) for n in a)
