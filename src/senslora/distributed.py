"""Calibration on several processes with torch.distributed: shard the batches, sum the statistics.

Under ``torchrun`` or ``accelerate launch`` every process calibrates on its shard of the
calibration batches (round-robin by batch index) and the statistics are all-reduced before any
metric is computed, so that every process ends with the statistics, and therefore the allocation,
of a single-process run over all the batches (equal up to the order of float additions).

What is reduced (`all_reduce_statistics`), with torch.distributed collectives only:

- ``column_values`` and ``gram`` (activation estimator) are sums over tokens: summed;
- ``diagonal`` (fisher, hutchinson) is a mean over ``num_tokens`` units (samples, batches or
  probes): each process contributes mean x count, the sum is divided by the total count;
- ``num_tokens``: summed.

A process whose shard is empty still takes part in every collective (with zero sums), so uneven
shards never hang. See docs/distributed.md for launch commands, memory and time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from senslora.stats import ModuleStats

__all__ = [
    "all_reduce_statistics",
    "distributed_world",
    "launched_process_group",
    "shard_batches",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def distributed_world(distributed: bool | None = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when calibration should be sharded and reduced, else None.

    ``None`` (automatic): distributed when a process group is initialised with more than one
    process. ``True`` requires an initialised process group; ``False`` never shards.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or None, got {distributed!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is False:
        return None
    if not initialised:
        if distributed:
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torchrun, accelerate launch or torch.distributed.init_process_group), "
                "but none is initialised"
            )
        return None
    world_size = dist.get_world_size()
    if distributed is None and world_size == 1:
        return None
    return dist.get_rank(), world_size


def shard_batches(batches: Iterable[T], rank: int, world_size: int) -> Iterable[T]:
    """The batches of process ``rank``: those whose index i has ``i % world_size == rank``.

    Deterministic and independent of batch contents. A sequence gives a list; any other iterable
    is consumed lazily (every process still iterates over all of it, skipping the others' items).
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"expected world_size >= 1 and 0 <= rank < world_size, got rank={rank} and "
            f"world_size={world_size}"
        )
    if isinstance(batches, Sequence):
        return [batches[i] for i in range(rank, len(batches), world_size)]
    return itertools.islice(batches, rank, None, world_size)


def all_reduce_statistics(
    stats: Mapping[str, ModuleStats], group: dist.ProcessGroup | None = None
) -> dict[str, ModuleStats]:
    """The statistics summed over every process of ``group`` (see the module docstring).

    Every process must pass statistics of the same modules, in the same order, from the same
    estimator; otherwise every process raises ValueError (no hang). The tensors of ``stats`` are
    reduced in place; the returned ModuleStats carry the total ``num_tokens``.
    """
    _check_same_modules(stats, group)
    backend = str(dist.get_backend(group))
    local_counts = [s.num_tokens for s in stats.values()]
    counts = torch.tensor(local_counts, dtype=torch.int64)
    totals = _all_reduce_(counts, backend, group).tolist()
    reduced = {}
    for (name, s), local, total in zip(stats.items(), local_counts, totals, strict=True):
        for tensor in (s.column_values, s.gram):  # sums over tokens
            if tensor is not None:
                _all_reduce_(tensor, backend, group)
        if s.diagonal is not None:  # a mean over num_tokens units
            s.diagonal.mul_(local)
            _all_reduce_(s.diagonal, backend, group)
            s.diagonal.div_(max(total, 1))
        reduced[name] = dataclasses.replace(s, num_tokens=int(total))
    return reduced


def _communication_device(tensor: torch.Tensor, backend: str) -> torch.device:
    """NCCL reduces CUDA tensors of the current device; gloo and mixed backends take CPU
    tensors as they are."""
    if "nccl" in backend and (backend == "nccl" or tensor.device.type == "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _all_reduce_(
    tensor: torch.Tensor,
    backend: str,
    group: dist.ProcessGroup | None,
    op: dist.ReduceOp = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """All-reduce ``tensor`` in place (SUM by default), through the device the backend needs."""
    device = _communication_device(tensor, backend)
    if device == tensor.device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


def _fingerprint(stats: Mapping[str, ModuleStats]) -> int:
    """A 62-bit digest of the module names, shapes, estimator and which tensors are present."""
    lines = "\n".join(
        f"{name}|{s.estimator}|{s.shape.out_features}x{s.shape.in_features}|{s.shape.transposed}"
        f"|{s.column_values is not None}{s.diagonal is not None}{s.gram is not None}"
        for name, s in stats.items()
    )
    return int.from_bytes(hashlib.sha256(lines.encode()).digest()[:8], "big") >> 2


def _check_same_modules(stats: Mapping[str, ModuleStats], group) -> None:
    """Every process raises the same ValueError when the statistics differ between processes."""
    mine = _fingerprint(stats)
    probe = torch.tensor([mine, -mine], dtype=torch.int64)  # MAX of both = max and -min
    _all_reduce_(probe, str(dist.get_backend(group)), group, op=dist.ReduceOp.MAX)
    largest, smallest = int(probe[0]), -int(probe[1])
    if largest != smallest:
        raise ValueError(
            f"the processes collected statistics of different modules ({len(stats)} here, "
            f"fingerprint {mine:x}; fingerprints range from {smallest:x} to {largest:x}): give "
            "every process the same model, targets and estimator"
        )


@contextlib.contextmanager
def launched_process_group(device: str = "auto") -> Iterator[int]:
    """Join the process group that torchrun / accelerate launch describe in the environment.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Uses NCCL
    (and the GPU ``LOCAL_RANK``) when ``device`` is ``auto``/``cuda`` and CUDA is available, else
    gloo. Yields this process's rank: 0 when the process was not launched with several processes.
    A process group that is already initialised is used as it is and left alone.
    """
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank()
        return
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or not dist.is_available():
        yield 0
        return
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda and device in ("auto", "cuda"):
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    logger.info("joined process group: rank %d of %d", dist.get_rank(), dist.get_world_size())
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None
