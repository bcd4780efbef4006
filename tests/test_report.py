"""The rank table and the concentration warning of an allocation."""

from __future__ import annotations

import logging

import torch

from senslora import AllocationConfig
from senslora.allocation import Allocation
from senslora.report import concentration_note, rank_table
from senslora.stats import ModuleStats
from senslora.targets import LayerShape


def allocation(ranks: list[int], shape=(64, 64)) -> Allocation:
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(len(ranks))]
    return Allocation(
        ranks=dict(zip(names, ranks, strict=True)),
        shapes={n: shape for n in names},
        metrics={},
        weights={},
        config=AllocationConfig(avg_rank=4),
    )


def test_balanced_allocation_gets_no_note():
    assert concentration_note(allocation([4] * 12)) is None
    assert concentration_note(allocation([2, 3, 4, 5, 6] * 4)) is None


def test_three_matrices_with_half_the_rank_are_flagged():
    note = concentration_note(allocation([20, 15, 15] + [1] * 50))
    assert note is not None
    assert "3 of 53 matrices hold 49%" not in note  # 50 of 100: exactly half is flagged
    assert "3 of 53 matrices hold 50%" in note
    assert "model.layers.0.mlp.down_proj 20" in note
    assert "max_rank" in note
    assert "full rank" not in note


def test_the_fewest_matrices_that_hold_half_are_named_with_their_shares():
    note = concentration_note(allocation([40, 20, 9, 9] + [1] * 22))  # total 100
    assert note.startswith("2 of 26 matrices hold 60% of the total rank")  # 40 + 20 >= 50
    assert "model.layers.0.mlp.down_proj 40 (40%)" in note
    assert "model.layers.2.mlp.down_proj" not in note  # not needed to reach half
    assert "uniform ranks would spread 50% of it over 13" in note
    assert "skip_positions=1" in note and "outlier_factor" in note and "fisher" in note
    # four matrices needed for half: more than top=3, not flagged
    assert concentration_note(allocation([13, 13, 13, 13] + [2] * 24)) is None


def test_full_rank_matrices_are_counted():
    note = concentration_note(allocation([8, 8, 8] + [1] * 12, shape=(8, 32)))
    assert note is not None and "3 at full rank" in note


def test_small_models_are_never_flagged():
    assert concentration_note(allocation([30, 1, 1, 1, 1])) is None


def test_rank_table_has_a_row_per_layer():
    table = rank_table(allocation([1, 2, 3]))
    assert table.row_count == 3


def test_training_allocation_logs_the_note(caplog, monkeypatch):
    """On statistics with two dominant inputs (as SmolLM2's down_proj gives), the allocation that
    training makes warns."""
    from senslora import pipeline
    from senslora.finetune.config import TrainConfig
    from senslora.finetune.methods import METHODS, RunContext
    from senslora.pipeline import Calibration

    stats = {}
    for i in range(16):
        values = torch.full((32,), 1e4 if i < 2 else 1.0)
        stats[f"layers.{i}.fc"] = ModuleStats(
            name=f"layers.{i}.fc",
            shape=LayerShape(32, 32, False),
            estimator="activation",
            column_values=values,
            num_tokens=10,
        )
    monkeypatch.setattr(pipeline, "collect_statistics", lambda *args, **kwargs: stats)
    context = RunContext(
        config=TrainConfig(
            method="senslora", task="rotten_tomatoes", avg_rank=4, estimator="activation"
        ),
        task_type="SEQ_CLS",
        targets=list(stats),
        total_steps=10,
        calibration_batches=lambda: [],
        calibration=Calibration(description="none"),
        train_batches=lambda: [],
    )
    with caplog.at_level(logging.WARNING, logger="senslora.finetune.methods"):
        result = METHODS["senslora"].allocate(torch.nn.Linear(2, 2), context)
    assert result.ranks["layers.0.fc"] > 20
    assert "2 of 16 matrices hold" in caplog.text  # the two dominant inputs, no third
    assert "layers.0.fc" in caplog.text
