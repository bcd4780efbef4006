"""What every fine-tuning method shares: the run context it prepares from, what it returns, and
the `Method` interface the training loop calls (and nothing else)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import peft
from torch import nn
from transformers import TrainerCallback

from senslora.allocation import Allocation
from senslora.peft_bridge import injected_ranks, verify_ranks
from senslora.pipeline import Calibration
from senslora.targets import find_target_modules

if TYPE_CHECKING:  # pragma: no cover
    from senslora.finetune.config import TrainConfig


@dataclass
class RunContext:
    """What a method may use to prepare a model, all of it from the run."""

    config: TrainConfig
    task_type: str
    """peft's task type: 'SEQ_CLS' or 'CAUSAL_LM'."""
    targets: list[str]
    """Full names of the modules every method adapts."""
    total_steps: int
    calibration_batches: Callable[[], Sequence[dict]]
    """Unlabelled token batches of ``config.calib`` (what senslora calibrates on)."""
    calibration: Calibration
    """Where those batches come from, for the allocation's provenance."""
    train_batches: Callable[[], Sequence[dict]]
    """The first batches of the labelled training set (EVA)."""
    labelled_batches: Callable[[], Sequence[dict]] = list
    """``calib_samples`` labelled training examples drawn with the seed (task-aware estimators)."""
    model_path: str | None = None
    saved_allocation: Allocation | None = None
    """The allocation of an interrupted run, reused when it resumes."""

    def lora_config(self) -> peft.LoraConfig:
        """Uniform LoRA over exactly ``targets``: the base every method shares."""
        config = self.config
        return peft.LoraConfig(
            r=config.avg_rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(self.targets),
            task_type=self.task_type,
        )


@dataclass
class Prepared:
    """A peft model ready to train, and what the run report needs from its method."""

    model: Any
    allocation: Allocation | None = None
    """Written to the run's allocation.json (and reused on resume)."""
    callbacks: list[TrainerCallback] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    """Method-specific entries of results.json (initial ranks, hypernetwork size, ...)."""


class Method:
    """One fine-tuning method: how it wraps the base model and what it reports."""

    name: ClassVar[str]
    checkpoints: ClassVar[bool] = True
    """Whether the Trainer's checkpoints hold all of its trained state (resumable)."""
    regularised_loss: ClassVar[bool] = False
    """Whether its training loss carries a regulariser (AdaLoRA's orthogonality term): such a
    loss is not comparable with the label prior's, so no stall is read from it."""

    def prepare(self, model: nn.Module, ctx: RunContext) -> Prepared:
        raise NotImplementedError

    def final_ranks(self, prepared: Prepared) -> dict[str, int] | None:
        """Per-module ranks at the end of training (None: not tracked)."""
        if prepared.allocation is not None:
            return prepared.allocation.ranks
        return injected_ranks(prepared.model)

    def finalize(self, prepared: Prepared) -> None:
        """Called before the adapter is saved."""

    def save(self, prepared: Prepared, folder: Path) -> None:
        """Write what was trained (a peft adapter) into ``folder``."""
        prepared.model.save_pretrained(folder)


def apply_allocation_to(model: nn.Module, ctx: RunContext, allocation: Allocation) -> Prepared:
    """``model`` with ``allocation``'s ranks, checked before and after injection."""
    allocation.check_model(model)
    peft_model = peft.get_peft_model(model, allocation.to_lora_config(ctx.lora_config()))
    verify_ranks(peft_model, allocation)
    return Prepared(peft_model, allocation)


def without_saved_allocation(ctx: RunContext) -> RunContext:
    """``ctx`` as for a fresh run: the allocation is measured again, not read back."""
    return dataclasses.replace(ctx, saved_allocation=None)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Full names of the modules to adapt: all-linear, comma-separated names, or a regex."""
    spec: str | list[str] = targets
    if "," in targets:
        spec = [t.strip() for t in targets.split(",") if t.strip()]
    return list(find_target_modules(model, spec))
