"""One call, peft style: calibration batches -> allocation -> `peft.PeftModel`.

    peft_model = senslora.get_peft_model(model, lora_config, dataloader, config=AllocationConfig())

is `compute_allocation` (statistics on ``dataloader`` + ranks) followed by `apply_allocation`
(``peft.get_peft_model`` with the allocation's LoraConfig, ranks verified). Like peft's EVA
(``get_eva_state_dict`` / ``initialize_lora_eva_weights``) it takes any iterable of batches and
two hooks for models whose forward is not ``model(**batch)``:

- ``prepare_model_inputs_fn(batch) -> batch``: applied to every batch first (drop text columns,
  rename keys, build tensors from ``datasets`` rows, ...);
- ``forward_fn(model, batch)``: how the model is run on a dict batch (default
  ``model(**batch)``; a sentence-transformers model wants ``model(batch)``). The batch's
  ``attention_mask`` still marks the real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import peft
from torch import nn

from senslora.allocation import Allocation, allocate_ranks
from senslora.batches import LossFn
from senslora.config import AllocationConfig
from senslora.estimators import DEFAULT_ESTIMATOR
from senslora.peft_bridge import apply_allocation, backbone_prefix
from senslora.pipeline import Calibration, calibrate
from senslora.targets import find_target_modules

ForwardFn = Callable[[nn.Module, Any], Any]
_INNER = "inner"


class _ForwardWith(nn.Module):
    """``model`` behind ``forward_fn``: called as ``wrapper(**batch)`` by the estimators, it runs
    ``forward_fn(model, batch)`` so that their hooks see the user's forward."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn):
        super().__init__()
        self.inner = model
        self._forward_fn = forward_fn

    def forward(self, *args: Any, **batch: Any) -> Any:
        return self._forward_fn(self.inner, batch if batch else args[0])

    def get_input_embeddings(self) -> nn.Module | None:
        """The inner model's input embeddings (they tell the estimators the input device)."""
        get = getattr(self.inner, "get_input_embeddings", None)
        return get() if callable(get) else None


def calibration_targets(lora_config: peft.LoraConfig | None) -> str | list[str]:
    """The modules to measure, from peft's ``target_modules``: None or ``"all-linear"`` ->
    every linear layer but the heads; a list -> suffix names; another string -> a regex."""
    if lora_config is None or lora_config.target_modules is None:
        return "all-linear"
    for option in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if getattr(lora_config, option, None) not in (None, [], ""):
            raise ValueError(
                f"expected the modules to be chosen by target_modules alone, got {option}="
                f"{getattr(lora_config, option)!r}; senslora gives every target its own rank"
            )
    targets = lora_config.target_modules
    return targets if isinstance(targets, str) else sorted(targets)


def compute_allocation(
    model: nn.Module,
    dataloader: Iterable[Any],
    lora_config: peft.LoraConfig | None = None,
    *,
    config: AllocationConfig | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable[[Any], Any] | None = None,
    loss_fn: LossFn | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Allocation:
    """The allocation of ``model`` on the calibration batches of ``dataloader``.

    Args:
        model: a transformers model, a sentence-transformers model, or any torch module.
        dataloader: any iterable of batches: a torch DataLoader, a list of dicts, ``datasets``
            rows through a collator; dicts are passed as ``model(**batch)``.
        lora_config: its ``target_modules`` choose the modules (default: all linear layers but
            the heads) and its ``r`` is the default average rank.
        config: the allocation settings (default: ``AllocationConfig(avg_rank=lora_config.r)``).
        estimator: ``"auto"`` (the default: fisher with the next-token loss for a causal LM,
            activation otherwise), ``"activation"`` (no labels), ``"fisher"`` or ``"hutchinson"``.
        forward_fn, prepare_model_inputs_fn: see the module docstring.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for fisher/hutchinson.
        provenance: recorded in the allocation (e.g. the calibration source).
    """
    if lora_config is not None and not isinstance(lora_config, peft.LoraConfig):
        raise ValueError(f"expected a peft.LoraConfig, got {type(lora_config).__name__}")
    if config is None:
        config = AllocationConfig(avg_rank=lora_config.r if lora_config is not None else 8)
    targets = calibration_targets(lora_config)
    batches = map(prepare_model_inputs_fn, dataloader) if prepare_model_inputs_fn else dataloader
    described = Calibration(description=(provenance or {}).get("calibration", "user batches"))
    if forward_fn is None:
        calibrated = calibrate(
            model,
            batches,
            estimator=estimator,
            targets=targets,
            loss_fn=loss_fn,
            calibration=described,
        )
        stats = calibrated.stats
    else:  # the wrapper's module names start with "inner."; its targets are the model's own
        names = [f"{_INNER}.{name}" for name in find_target_modules(model, targets)]
        loss = _inner_loss(loss_fn) if loss_fn is not None else None
        calibrated = calibrate(
            _ForwardWith(model, forward_fn),
            batches,
            estimator=estimator,
            targets=names,
            loss_fn=loss,
            calibration=described,
        )
        stats = {name.removeprefix(_INNER + "."): s for name, s in calibrated.stats.items()}
    record = {**calibrated.provenance, "model_class": type(model).__name__, **(provenance or {})}
    return allocate_ranks(stats, config, provenance=record, backbone=backbone_prefix(model))


def _inner_loss(loss_fn: LossFn) -> LossFn:
    """The user's loss, called on the user's model rather than on the forward wrapper."""

    def loss(wrapper: nn.Module, batch: Any):
        return loss_fn(wrapper.inner, batch)

    return loss


def get_peft_model(
    model: nn.Module,
    lora_config: peft.LoraConfig,
    dataloader: Iterable[Any],
    *,
    config: AllocationConfig | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable[[Any], Any] | None = None,
    loss_fn: LossFn | None = None,
    alpha_policy: str = "scale",
    adapter_name: str = "default",
) -> peft.PeftModel:
    """``peft.get_peft_model`` with Sensitivity-LoRA ranks measured on ``dataloader``.

    ``lora_config`` is the base (its ``r`` is the default average rank, its ``lora_alpha``
    the scaling every module keeps under ``alpha_policy="scale"``, its ``target_modules`` the
    modules to rank); the returned ``PeftModel`` has each module at its allocated rank, checked
    after injection. The other arguments are those of `compute_allocation`.
    """
    allocation = compute_allocation(
        model,
        dataloader,
        lora_config,
        config=config,
        estimator=estimator,
        forward_fn=forward_fn,
        prepare_model_inputs_fn=prepare_model_inputs_fn,
        loss_fn=loss_fn,
    )
    return apply_allocation(
        model, allocation, lora_config, alpha_policy=alpha_policy, adapter_name=adapter_name
    )


__all__ = ["calibration_targets", "compute_allocation", "get_peft_model"]
