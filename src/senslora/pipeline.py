"""Model + calibration batches -> `Allocation` with full provenance: the one path shared by
`senslora allocate`, the fine-tuning methods and the Python API.

    calibration batches -> statistics (`collect_statistics`) -> metrics and ranks
    (`allocate_ranks`) -> Allocation (ranks, metrics, configuration, provenance)
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from senslora.allocation import Allocation, allocate_ranks
from senslora.batches import LossFn
from senslora.config import AllocationConfig
from senslora.data import CalibrationConfig, describe_source
from senslora.estimators import DEFAULT_ESTIMATOR, collect_statistics
from senslora.peft_bridge import backbone_prefix
from senslora.stats import ModuleStats
from senslora.targets import TargetSpec


@dataclass(frozen=True)
class Calibration:
    """Where the calibration batches come from, for the provenance of an allocation.

    ``config`` is the `CalibrationConfig` that made the batches, or None when they come from
    elsewhere (a task's training examples, a user's dataloader); ``description`` then names them.
    """

    config: CalibrationConfig | None = None
    description: str | None = None

    def describe(self) -> str:
        if self.description is not None:
            return self.description
        if self.config is None:
            return "user batches"
        return describe_source(self.config.source, split=self.config.split)


@dataclass(frozen=True)
class Calibrated:
    """Statistics of every target module and the provenance of how they were made."""

    stats: dict[str, ModuleStats]
    provenance: dict[str, Any]
    backbone: str = ""
    """The backbone's path in the measured model: the LoraConfig's keys are relative to it."""

    def allocate(self, config: AllocationConfig) -> Allocation:
        return allocate_ranks(
            self.stats, config, provenance=self.provenance, backbone=self.backbone
        )


class _Tally:
    """Counts the sequences and real tokens of the batches as they pass (any iterable, once)."""

    def __init__(self) -> None:
        self.sequences = self.tokens = 0

    def count(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            if isinstance(batch, Mapping) and "input_ids" in batch:
                self.sequences += len(batch["input_ids"])
                mask = batch.get("attention_mask")
                self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            yield batch


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    targets: TargetSpec = "all-linear",
    loss_fn: LossFn | None = None,
    keep_gram: bool = False,
    num_probes: int = 8,
    seed: int = 0,
    skip_positions: int = 0,
    outlier_factor: float | None = None,
    model_path: str | None = None,
    calibration: Calibration | None = None,
    progress: Callable[[Sequence[dict]], Iterable[dict]] | None = None,
) -> Calibrated:
    """Collect the statistics of ``model`` on ``batches`` and record how they were made.

    ``batches`` is any iterable, read once. ``progress`` wraps a sequence of batches (a progress
    bar) without changing them; ``loss_fn`` is the fisher / hutchinson loss; ``skip_positions``
    and ``outlier_factor`` are the activation estimator's token filters (`collect_statistics`).
    """
    from senslora import __version__

    calibration = calibration or Calibration()
    tally = _Tally()
    start = time.perf_counter()
    stats = collect_statistics(
        model,
        tally.count(progress(batches) if progress is not None else batches),
        estimator=estimator,
        targets=targets,
        loss_fn=loss_fn,
        num_probes=num_probes,
        seed=seed,
        keep_gram=keep_gram,
        skip_positions=skip_positions,
        outlier_factor=outlier_factor,
    )
    provenance = {
        "model": model_path,
        "model_class": type(model).__name__,
        "calibration": calibration.describe(),
        "calibration_config": (
            dataclasses.asdict(calibration.config) if calibration.config is not None else None
        ),
        "num_sequences": tally.sequences,
        "num_tokens": tally.tokens,
        "estimator": next(iter(stats.values())).estimator,  # what "auto" resolved to
        "estimator_requested": estimator,
        "token_filters": {"skip_positions": skip_positions, "outlier_factor": outlier_factor},
        "targets": targets if isinstance(targets, str) else list(targets),
        "senslora_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "calibration_seconds": round(time.perf_counter() - start, 3),
        "world_size": _world_size(),
    }
    return Calibrated(stats, provenance, backbone_prefix(model))


def allocate_model(
    model: nn.Module, batches: Sequence[dict], config: AllocationConfig, **calibrate_options
) -> Allocation:
    """`calibrate` then `allocate_ranks`: the allocation of ``model`` with its provenance.
    ``calibrate_options`` are those of `calibrate`; the eigenvalue spectrum and the inverse
    curvature keep the whole 2XX^T."""
    keep_gram = config.spectrum == "eigenvalues" or config.curvature == "inverse"
    calibrate_options.setdefault("keep_gram", keep_gram)
    return calibrate(model, batches, **calibrate_options).allocate(config)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
