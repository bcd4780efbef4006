"""A run's peak memory is its own: a process that runs several (a bench grid, the demo) must not
report an earlier run's peak for a later one."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import folders, train  # noqa: F401  (fixture: tiny model folders, task files)

from senslora.finetune.results import _malloc_trim, peak_memory_mb, reset_peak_memory

LINUX_PROC = Path("/proc/self/clear_refs").exists() and not torch.cuda.is_available()


def resident(mib: int) -> mmap.mmap:
    """`mib` MiB of anonymous memory with every page touched. Mapped by the test itself, so that
    closing it returns the pages to the system at once (a tensor's memory goes back through the
    allocator, which may keep it)."""
    block = mmap.mmap(-1, mib * 2**20)
    chunk = b"\x01" * 2**20
    for _ in range(mib):
        block.write(chunk)
    return block


@pytest.mark.skipif(not LINUX_PROC, reason="the CPU peak is reset through Linux's /proc")
def test_reset_forgets_a_peak_reached_before_it():
    big = resident(128)
    before = peak_memory_mb()
    big.close()
    assert reset_peak_memory() == "run"
    after = peak_memory_mb()
    assert after < before - 100
    again = resident(128)
    assert peak_memory_mb() > after + 100  # and it still measures what comes after
    again.close()


@pytest.mark.skipif(not LINUX_PROC, reason="the CPU peak is reset through Linux's /proc")
def test_a_run_after_a_bigger_one_reports_its_own_peak(folders, tmp_path):  # noqa: F811
    ballast = resident(512)  # far above the tiny run's needs
    high_water = peak_memory_mb()
    ballast.close()
    results = train(folders, tmp_path, method="lora", epochs=1)
    assert results["peak_memory_scope"] == "run"
    assert results["peak_memory_mb"] < high_water - 256


# Run in a fresh interpreter: in the test process the heap already holds whatever earlier tests
# freed, and new blocks would land there instead of on new pages.
ALLOCATOR_SCENARIO = """
import re
from pathlib import Path
from senslora.finetune.results import peak_memory_mb, reset_peak_memory

def resident():
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\\s+(\\d+) kB", status, re.MULTILINE).group(1)) / 1024

# 128 MiB in 64 KiB blocks from the C heap, each followed by a small block that stays alive:
# freeing the large ones leaves holes the allocator keeps, as after a training run.
start = resident()
blocks, keepers = [], []
for i in range(2048):
    blocks.append(bytes([i % 256]) * 2**16)
    keepers.append(bytes([i % 256]) * 1024)
del blocks
kept = resident()
scope = reset_peak_memory()
print(start, kept, resident(), peak_memory_mb(), scope)
"""


@pytest.mark.skipif(
    not LINUX_PROC or _malloc_trim() is None, reason="needs Linux's /proc and glibc's malloc_trim"
)
def test_reset_returns_what_the_allocator_kept_from_an_earlier_run():
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_SCENARIO], capture_output=True, text=True, check=True
    )
    start, kept, after, peak, scope = done.stdout.split()
    start, kept, after, peak = map(float, (start, kept, after, peak))
    assert scope == "run"
    assert kept > start + 100  # the freed memory is still resident
    assert after < kept - 100  # given back before the run's window opens
    assert peak < kept - 100
