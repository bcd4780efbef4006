"""The --quick modes of the equal-parameter study's benchmarks run end to end (no timing)."""

from __future__ import annotations

import pytest
from test_benchmarks_quick import run_quick

UNIFORM_R4 = 4 * 2 * (4 * (32 + 32) + 2 * (128 + 32))  # the quick BERT: 2 layers, width 32


@pytest.mark.real_model
def test_fisher_calibration_quick(tmp_path, monkeypatch):
    payload = run_quick("fisher_calibration", tmp_path / "out.json", monkeypatch)
    assert set(payload["timings"]) == {"activation", "fisher"}
    assert max(payload["num_parameters"].values()) <= UNIFORM_R4


@pytest.mark.real_model
def test_allocation_controls_quick(tmp_path, monkeypatch):
    payload = run_quick("allocation_controls", tmp_path / "out.json", monkeypatch)
    counts = payload["num_parameters"]
    assert counts["shuffled-params"] == counts["senslora-params"]
    assert max(counts[n] for n in counts if n.endswith("-params")) <= UNIFORM_R4
