"""The fine-tuning methods behind one interface: base model in, peft model out.

Every method adapts the same modules with the same rank budget (average rank ``avg_rank`` per
adapted matrix, so the same total rank as uniform LoRA) and the same alpha/r scaling:

- ``lora``: uniform rank;
- ``senslora`` (+ ``-global``, ``-local``, ``-pra`` ablations): per-module ranks from
  sensitivity on a calibration set (paper Section 3, Table 3, Section 4.4);
- ``adalora``: peft's AdaLoRA, starting at 1.5 x avg_rank and pruned to avg_rank on average; its
  budget schedule needs ``update_and_allocate`` every step (`AdaLoraCallback` does it);
- ``eva``: peft's EVA (SVD of activations initialises A and redistributes ranks, same total).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import peft
from torch import nn
from transformers import TrainerCallback

from senslora.allocator import Allocation, allocate_ranks
from senslora.config import AllocationConfig, TrainConfig
from senslora.estimators import collect_statistics
from senslora.peft_bridge import verify_ranks
from senslora.targets import find_target_modules

logger = logging.getLogger(__name__)

SENSLORA_VARIANTS = {
    "senslora": {},
    "senslora-global": {"score": "global"},
    "senslora-local": {"score": "local"},
    "senslora-pra": {"scheme": "pra"},
}


@dataclasses.dataclass
class PreparedModel:
    """A peft model ready to train, with what the run report needs."""

    model: Any
    allocation: Allocation | None
    notes: dict[str, Any]


def target_names(model: nn.Module, targets: str) -> list[str]:
    spec: str | list[str] = targets
    if "," in targets:
        spec = [t.strip() for t in targets.split(",") if t.strip()]
    return list(find_target_modules(model, spec))


def lora_config(config: TrainConfig, names: list[str], task_type: str) -> peft.LoraConfig:
    """Uniform LoRA over exactly ``names``: the base every method shares."""
    return peft.LoraConfig(
        r=config.avg_rank,
        lora_alpha=config.alpha,
        lora_dropout=config.lora_dropout,
        target_modules=names,
        task_type=task_type,
    )


def prepare_model(
    model: nn.Module,
    config: TrainConfig,
    *,
    task_type: str,
    calibration_batches: Callable[[], Iterable[dict]],
    train_batches: Callable[[], Iterable[dict]],
    total_steps: int,
    allocation: Allocation | None = None,
) -> PreparedModel:
    """Wrap ``model`` for ``config.method``; ``allocation`` reuses a saved one (resume)."""
    names = target_names(model, config.targets)
    base = lora_config(config, names, task_type)
    method = config.method
    if method == "lora":
        return PreparedModel(peft.get_peft_model(model, base), None, {})
    if method in SENSLORA_VARIANTS:
        if allocation is None:
            stats = collect_statistics(
                model, calibration_batches(), estimator=config.estimator, targets=names
            )
            alloc_config = AllocationConfig(avg_rank=config.avg_rank, **SENSLORA_VARIANTS[method])
            allocation = allocate_ranks(stats, alloc_config, provenance={"calib": config.calib})
        allocation.check_model(model)
        peft_model = peft.get_peft_model(model, allocation.to_lora_config(base))
        verify_ranks(peft_model, allocation)
        return PreparedModel(peft_model, allocation, {})
    if method == "adalora":
        return PreparedModel(_adalora(model, config, base, total_steps), None, {})
    if method == "eva":
        return _eva(model, config, base, train_batches)
    raise ValueError(f"unknown method {method!r}")


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's phases: 10% warm-up at the initial rank, pruning, the last 20% at fixed ranks;
    a reallocation every ~1% of training (at least every step)."""
    tinit = max(1, total_steps // 10)
    tfinal = max(1, total_steps // 5)
    if tinit >= total_steps - tfinal:
        raise ValueError(
            f"AdaLoRA needs more training steps to schedule its budget, got {total_steps}"
        )
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, total_steps // 100)}


def _adalora(model, config: TrainConfig, base: peft.LoraConfig, total_steps: int):
    init_r = config.adalora_init_rank or max(config.avg_rank + 1, (3 * config.avg_rank) // 2)
    ada = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=config.avg_rank,
        lora_alpha=config.alpha,
        lora_dropout=config.lora_dropout,
        target_modules=base.target_modules,
        task_type=base.task_type,
        total_step=total_steps,
        **adalora_schedule(total_steps),
    )
    return peft.get_peft_model(model, ada)


def _eva(model, config: TrainConfig, base: peft.LoraConfig, train_batches) -> PreparedModel:
    eva_config = dataclasses.replace(
        base, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=config.eva_rho)
    )
    peft_model = peft.get_peft_model(model, eva_config, low_cpu_mem_usage=True)
    peft.initialize_lora_eva_weights(peft_model, _model_inputs(train_batches()))
    ranks = {
        name: int(module.r["default"])
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.r
    }
    return PreparedModel(peft_model, None, {"eva_ranks": ranks})


def _model_inputs(batches: Iterable[dict]) -> list[dict]:
    """EVA runs the model on input_ids/attention_mask only."""
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in batches]


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after every optimizer step, before the gradients
    are zeroed (it scores parameters with them). Without it AdaLoRA silently trains at its
    initial rank."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        unwrapped = getattr(model, "module", model)  # DDP wraps the model
        unwrapped.base_model.update_and_allocate(state.global_step)


def adalora_ranks(model) -> dict[str, int]:
    """Current ranks of an AdaLoRA model: non-zero singular values per module."""
    ranks = {}
    for name, module in model.get_base_model().named_modules():
        lora_e = getattr(module, "lora_E", None)
        if lora_e is not None and "default" in lora_e:
            ranks[name] = int((lora_e["default"].detach() != 0).sum())
    return ranks


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
