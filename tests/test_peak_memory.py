"""A run's peak memory is its own: a process that runs several (a bench grid, the demo) must not
report an earlier run's peak for a later one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import folders, train  # noqa: F401  (fixture: tiny model folders, task files)

from senslora.finetune.results import peak_memory_mb, reset_peak_memory

LINUX_PROC = Path("/proc/self/clear_refs").exists() and not torch.cuda.is_available()


@pytest.mark.skipif(not LINUX_PROC, reason="the CPU peak is reset through Linux's /proc")
def test_reset_forgets_a_peak_reached_before_it():
    big = torch.ones(2**27, dtype=torch.uint8)  # 128 MiB, every page touched
    before = peak_memory_mb()
    del big  # a large block goes back to the system at once
    assert reset_peak_memory() == "run"
    after = peak_memory_mb()
    assert after < before - 100
    again = torch.ones(2**27, dtype=torch.uint8)
    assert peak_memory_mb() > after + 100  # and it still measures what comes after
    del again


@pytest.mark.skipif(not LINUX_PROC, reason="the CPU peak is reset through Linux's /proc")
def test_a_run_after_a_bigger_one_reports_its_own_peak(folders, tmp_path):  # noqa: F811
    ballast = torch.ones(2**29, dtype=torch.uint8)  # 512 MiB: far above the tiny run's needs
    high_water = peak_memory_mb()
    del ballast
    results = train(folders, tmp_path, method="lora", epochs=1)
    assert results["peak_memory_scope"] == "run"
    assert results["peak_memory_mb"] < high_water - 256
