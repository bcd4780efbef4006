"""`senslora.compare` and `senslora compare`: rank correlations and rank differences."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tiny_bert, token_batches
from typer.testing import CliRunner

from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.cli import app
from senslora.compare import compare_allocations, kendall, plot_comparison, spearman


def test_spearman_and_kendall_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swap of 4 items: d = (0, 0, 1, 1) -> 1 - 6*2 / (4*15) = 0.8; tau = (5 - 1) / 6
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert kendall([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # ties: average ranks (Spearman) and tau-b (Kendall)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)
    assert kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / (3 * 2) ** 0.5)
    assert spearman([2, 2, 2], [1, 2, 3]) is None and kendall([1, 2], [5, 5]) is None
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])


@pytest.fixture(scope="module")
def allocations():
    model = tiny_bert()
    a = allocate_ranks(
        collect_statistics(model, token_batches(seed=0)), AllocationConfig(avg_rank=3)
    )
    b = allocate_ranks(
        collect_statistics(model, token_batches(seed=5)), AllocationConfig(avg_rank=3)
    )
    return a, b


def test_compare_allocations(allocations):
    a, b = allocations
    same = compare_allocations(a, a)
    assert same.spearman_theta == pytest.approx(1.0) and same.kendall_theta == pytest.approx(1.0)
    assert same.share_ranks_differ == 0 and same.rank_l1 == 0 and same.largest_differences == []
    other = compare_allocations(a, b)
    names = list(a.ranks)
    differences = [abs(a.ranks[n] - b.ranks[n]) for n in names]
    assert other.num_modules == len(names) == 12
    assert other.rank_l1 == sum(differences) and other.max_rank_difference == max(differences)
    assert other.share_ranks_differ == pytest.approx(sum(d > 0 for d in differences) / 12)
    assert other.spearman_theta == pytest.approx(
        spearman([a.metrics[n]["theta"] for n in names], [b.metrics[n]["theta"] for n in names])
    )
    assert max(differences) > 0  # the two calibration sets give different ranks
    name, rank_a, rank_b = other.largest_differences[0]
    assert abs(rank_a - rank_b) == max(differences)
    assert (a.ranks[name], b.ranks[name]) == (rank_a, rank_b)
    for listed, ra, rb in other.largest_differences:
        assert ra != rb and (a.ranks[listed], b.ranks[listed]) == (ra, rb)
    shifted = dataclasses.replace(b, config=AllocationConfig(avg_rank=5))
    assert compare_allocations(a, shifted).config_differences == {"avg_rank": (3, 5)}


def test_compare_refuses_different_shapes(allocations):
    a, b = allocations
    name = next(iter(a.shapes))
    wider = dataclasses.replace(b, shapes={**b.shapes, name: (99, 16)})
    with pytest.raises(ValueError, match=f"{name} is 16x16 in the first and 99x16 in the second"):
        compare_allocations(a, wider)


def test_plot_comparison_writes_a_png(allocations, tmp_path):
    path = plot_comparison(*allocations, tmp_path / "c.png", labels=("wiki", "rt"))
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary file left


def test_cli_compare(allocations, tmp_path):
    allocations[0].save(str(tmp_path / "a"))
    allocations[1].save(str(tmp_path / "b"))
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b" / "allocation.json")]
    printed = CliRunner().invoke(app, args)
    assert printed.exit_code == 0, printed.output
    assert "Spearman of theta" in printed.output and "L1 distance of ranks" in printed.output
    assert not (tmp_path / "out").exists()
    written = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert written.exit_code == 0, written.output
    record = json.loads((tmp_path / "out" / "comparison.json").read_text())
    expected = compare_allocations(*allocations)
    assert record["rank_l1"] == expected.rank_l1
    assert record["spearman_ranks"] == pytest.approx(expected.spearman_ranks)
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
