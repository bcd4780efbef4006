"""Sensitivity-LoRA and its variants, and the controls of the equal-parameter study: methods
whose ranks come from an `Allocation`."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import peft
from torch import nn

from senslora.allocation import Allocation
from senslora.config import AllocationConfig
from senslora.controls import (
    matched_uniform_rank,
    model_shapes,
    shuffle_ranks,
    size_prior_allocation,
)
from senslora.finetune.methods.base import (
    Method,
    Prepared,
    RunContext,
    apply_allocation_to,
    without_saved_allocation,
)
from senslora.peft_bridge import backbone_prefix
from senslora.pipeline import Calibration, allocate_model
from senslora.report import concentration_note

if TYPE_CHECKING:  # pragma: no cover
    from senslora.finetune.config import TrainConfig

logger = logging.getLogger("senslora.finetune.methods")


@dataclass(frozen=True)
class Sensitivity(Method):
    """Sensitivity-LoRA: ranks from the allocation of ``variant`` (AllocationConfig fields)."""

    name: str = "senslora"
    variant: tuple[tuple[str, Any], ...] = ()
    estimator: str | None = None
    """None: ``config.estimator`` (`task_fisher` says what 'auto' reads); 'fisher': the Fisher of
    the labelled training examples (the task's own loss)."""

    def allocation_config(self, config: TrainConfig, **overrides: Any) -> AllocationConfig:
        fields = {"avg_rank": config.avg_rank, "max_rank": config.max_rank, "budget": config.budget}
        return AllocationConfig(**{**fields, **dict(self.variant), **overrides})

    def allocate(self, model: nn.Module, ctx: RunContext, **overrides: Any) -> Allocation:
        """The allocation of this variant (``overrides``: AllocationConfig fields)."""
        if ctx.saved_allocation is not None:
            return ctx.saved_allocation
        config = self.allocation_config(ctx.config, **overrides)
        labelled = task_fisher(self.estimator, ctx, config)
        if labelled and self.estimator is None and ctx.config.calib != _default("calib", ctx):
            logger.warning(
                "calib=%r is not read: the estimator 'auto' of a classifier reads the task's "
                "labelled training examples; pass estimator='activation' to calibrate on it",
                ctx.config.calib,
            )
        batches = ctx.labelled_batches() if labelled else ctx.calibration_batches()
        if labelled and not batches:
            raise ValueError(
                f"the {self.name} method reads the Fisher of the task's labelled training "
                f"examples (estimator={self.estimator or ctx.config.estimator!r} on a "
                "classifier), and no labelled batches were given: pass labelled_batches, or "
                "estimator='activation' to calibrate on the calibration batches"
            )
        allocation = allocate_model(
            model,
            batches,
            config,
            estimator="fisher" if labelled else self.estimator or ctx.config.estimator,
            targets=ctx.targets,
            seed=ctx.config.seed,
            skip_positions=0 if labelled else ctx.config.skip_positions,
            outlier_factor=None if labelled else ctx.config.outlier_factor,
            model_path=ctx.model_path,
            calibration=(
                Calibration(description="the task's labelled training examples")
                if labelled
                else ctx.calibration
            ),
        )
        note = concentration_note(allocation)
        if note:
            logger.warning(note)
        return allocation

    def prepare(self, model, ctx):
        return apply_allocation_to(model, ctx, self.allocate(model, ctx))


def _default(field: str, ctx: RunContext) -> Any:
    """The run config's default value of ``field``."""
    return next(f.default for f in dataclasses.fields(ctx.config) if f.name == field)


def task_fisher(estimator: str | None, ctx: RunContext, config: AllocationConfig) -> bool:
    """Whether a sensitivity method reads the Fisher of the task's labelled training examples.

    Yes when the method asks for it (``estimator='fisher'``, `senslora-fisher`), and when the
    run's estimator is 'auto' on a classification task, unless the run asks for what only the
    activation statistics give (token filters, the Gram matrix of ``curvature='inverse'`` or
    ``spectrum='eigenvalues'``). Why 'auto' means the task's Fisher there: in the equal-parameter
    study no allocation beats uniform LoRA, and the activation statistics are the furthest behind
    it (docs/method.md, "The default for fine-tuning an encoder"). A causal LM's 'auto' stays the
    next-token Fisher on the calibration text (`senslora.estimators.resolve_estimator`)."""
    if estimator is not None:
        return estimator == "fisher"
    run = ctx.config
    activation_only = (
        bool(run.skip_positions)
        or run.outlier_factor is not None
        or config.curvature == "inverse"
        or config.spectrum == "eigenvalues"
    )
    return run.estimator == "auto" and ctx.task_type == "SEQ_CLS" and not activation_only


class LoraMatched(Method):
    """Uniform LoRA at the rank whose parameter count is closest to senslora's equal-rank
    allocation (209,664 on MiniLM -> r = 5, 207,360): the baseline of an equal-rank comparison.
    alpha/r stays that of uniform LoRA at the average rank."""

    name = "lora-matched"

    def prepare(self, model, ctx):
        reference = Sensitivity().allocate(model, without_saved_allocation(ctx), budget="rank")
        rank = matched_uniform_rank(reference.shapes, reference.num_parameters)
        base = ctx.lora_config()
        lora = dataclasses.replace(base, r=rank, lora_alpha=base.lora_alpha * rank / base.r)
        report = {"matched_rank": rank, "matched_parameters": reference.num_parameters}
        return Prepared(peft.get_peft_model(model, lora), report=report)


class SizePrior(Method):
    """theta = d_out x d_in through senslora's rounding and budget: no calibration, no weights.
    Answers "is it the data or the shapes?"."""

    name = "size-prior"

    def prepare(self, model, ctx):
        allocation = ctx.saved_allocation or size_prior_allocation(
            model_shapes(model, ctx.targets),
            Sensitivity().allocation_config(ctx.config),
        ).with_backbone(backbone_prefix(model))
        return apply_allocation_to(model, ctx, allocation)


class Shuffled(Method):
    """senslora's ranks permuted among matrices of the same shape (seeded with the run's seed):
    the same parameter count and shape profile, the per-matrix assignment destroyed. Answers
    "does the specific assignment matter?"."""

    name = "shuffled"

    def prepare(self, model, ctx):
        allocation = ctx.saved_allocation or shuffle_ranks(
            Sensitivity().allocate(model, ctx), seed=ctx.config.seed
        )
        return apply_allocation_to(model, ctx, allocation)
