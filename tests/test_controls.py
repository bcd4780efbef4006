"""Controls of the equal-parameter study: matched uniform rank, size prior, shuffled ranks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_bert, token_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.controls import (
    matched_uniform_rank,
    model_shapes,
    shuffle_ranks,
    size_prior_allocation,
    uniform_lora_parameters,
)
from senslora.serialization import load_allocation


def minilm_shapes() -> dict[str, tuple[int, int]]:
    """The 36 adapted matrices of MiniLM-L6 (hidden 384, intermediate 1536)."""
    shapes = {}
    for layer in range(6):
        prefix = f"encoder.layer.{layer}"
        for part in ("attention.self.query", "attention.self.key", "attention.self.value"):
            shapes[f"{prefix}.{part}"] = (384, 384)
        shapes[f"{prefix}.attention.output.dense"] = (384, 384)
        shapes[f"{prefix}.intermediate.dense"] = (1536, 384)
        shapes[f"{prefix}.output.dense"] = (384, 1536)
    return shapes


def test_matched_rank_of_senslora_on_minilm_is_five():
    shapes = minilm_shapes()
    assert uniform_lora_parameters(shapes, 4) == 165_888
    assert matched_uniform_rank(shapes, 209_664) == 5
    assert uniform_lora_parameters(shapes, 5) == 207_360


def test_matched_rank_tie_goes_to_the_larger_rank():
    shapes = {"a": (10, 10)}  # 20 parameters per unit of rank
    assert matched_uniform_rank(shapes, 50) == 3  # 40 and 60 equally far
    assert matched_uniform_rank(shapes, 49) == 2
    assert matched_uniform_rank(shapes, 51) == 3


def test_matched_rank_respects_the_matrix_caps():
    shapes = {"small": (2, 100), "big": (50, 50)}  # small is capped at rank 2
    assert uniform_lora_parameters(shapes, 3) == 2 * 102 + 3 * 100
    assert matched_uniform_rank(shapes, 2 * 102 + 3 * 100) == 3
    assert matched_uniform_rank(shapes, 10**9) == 50  # no rank beyond the largest cap


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6),
    st.integers(1, 20_000),
)
def test_matched_rank_is_the_closest_count(shape_list, target):
    shapes = {f"m{i}": s for i, s in enumerate(shape_list)}
    rank = matched_uniform_rank(shapes, target)
    gap = abs(uniform_lora_parameters(shapes, rank) - target)
    for other in range(1, 41):
        assert gap <= abs(uniform_lora_parameters(shapes, other) - target)


def test_matched_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="positive parameter count"):
        matched_uniform_rank({"a": (4, 4)}, 0)
    with pytest.raises(ValueError, match="at least one module"):
        matched_uniform_rank({}, 10)


class NoForward(torch.nn.Module):
    """Adaptable layers whose forward must never run."""

    def __init__(self):
        super().__init__()
        self.small = torch.nn.Linear(8, 8)
        self.wide = torch.nn.Linear(8, 32)
        self.tall = torch.nn.Linear(32, 8)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the size prior must not run the model")


def test_size_prior_needs_no_calibration_pass():
    shapes = model_shapes(NoForward())
    assert shapes == {"small": (8, 8), "wide": (32, 8), "tall": (8, 32)}
    config = AllocationConfig(avg_rank=4, budget="parameters")
    allocation = size_prior_allocation(shapes, config)
    assert allocation.provenance["control"] == "size prior"
    assert allocation.num_parameters <= allocation.uniform_parameters()
    assert min(allocation.ranks["wide"], allocation.ranks["tall"]) > allocation.ranks["small"]
    assert allocation.metrics["wide"]["theta"] == 256.0


def test_size_prior_is_senslora_rounding_of_a_flat_hessian(tmp_path):
    """A Hessian diagonal of ones makes the trace d_out * d_in: the global-score allocation of
    such statistics is the size prior, rank for rank."""
    model = tiny_bert()
    stats = collect_statistics(model, token_batches(num_batches=1))
    for s in stats.values():
        s.column_values = torch.ones_like(s.column_values)
    for budget in ("rank", "parameters"):
        config = AllocationConfig(avg_rank=3, budget=budget, score="global")
        prior = size_prior_allocation(model_shapes(model), config)
        assert prior.ranks == allocate_ranks(stats, config).ranks
    prior.save(str(tmp_path / "prior.json"))
    assert load_allocation(str(tmp_path / "prior.json")).ranks == prior.ranks


def varied_allocation():
    stats = collect_statistics(tiny_bert(), token_batches(num_batches=2))
    return allocate_ranks(stats, AllocationConfig(avg_rank=3, budget="parameters"))


def test_shuffle_keeps_parameters_and_ranks_per_shape():
    allocation = varied_allocation()
    for seed in range(5):
        shuffled = shuffle_ranks(allocation, seed=seed)
        assert shuffled.num_parameters == allocation.num_parameters
        for shape in set(allocation.shapes.values()):
            names = [n for n in allocation.ranks if allocation.shapes[n] == shape]
            assert Counter(shuffled.ranks[n] for n in names) == Counter(
                allocation.ranks[n] for n in names
            )
        permutation = shuffled.provenance["permutation"]
        assert shuffled.provenance["shuffle_seed"] == seed
        assert all(shuffled.ranks[n] == allocation.ranks[permutation[n]] for n in permutation)
        assert all(allocation.shapes[n] == allocation.shapes[permutation[n]] for n in permutation)


def test_shuffle_actually_permutes_and_is_seeded():
    allocation = varied_allocation()
    names = [n for n in allocation.ranks if allocation.shapes[n] == (16, 16)]
    assert len({allocation.ranks[n] for n in names}) > 1, "the test needs distinct ranks"
    for seed in range(20):
        assert shuffle_ranks(allocation, seed=seed).ranks != allocation.ranks
    assert shuffle_ranks(allocation, seed=3).ranks == shuffle_ranks(allocation, seed=3).ranks


def test_shuffle_of_two_distinct_ranks_always_swaps():
    allocation = size_prior_allocation({"a": (8, 8), "b": (8, 8)}, AllocationConfig(avg_rank=2))
    allocation.ranks = {"a": 1, "b": 3}
    for seed in range(30):
        assert shuffle_ranks(allocation, seed=seed).ranks == {"a": 3, "b": 1}
