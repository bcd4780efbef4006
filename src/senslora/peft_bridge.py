"""Allocation <-> peft: a LoraConfig with exact per-module ranks, and a check after injection.

peft matches ``rank_pattern``/``alpha_pattern`` keys as regular expressions against module names and
silently ignores keys that match nothing, so every key here is a full module name, regex-escaped
and anchored (``^encoder\\.layer\\.0\\.attention\\.self\\.query$``), and `verify_ranks` checks the
injected model afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import peft
from peft.tuners.lora import LoraLayer
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from senslora.allocation import Allocation

ALPHA_POLICIES = ("scale", "rslora", "constant")


def pattern_key(module_name: str) -> str:
    """The anchored, escaped regex that matches exactly one full module name."""
    return f"^{re.escape(module_name)}$"


def lora_patterns(
    ranks: Mapping[str, int], alphas: Mapping[str, float]
) -> tuple[dict[str, int], dict[str, float]]:
    """peft's ``rank_pattern`` and ``alpha_pattern``: one `pattern_key` per module."""
    rank_pattern = {pattern_key(name): rank for name, rank in ranks.items()}
    return rank_pattern, {pattern_key(name): alpha for name, alpha in alphas.items()}


def lora_alphas(
    ranks: dict[str, int], base: peft.LoraConfig, alpha_policy: str = "scale"
) -> dict[str, float]:
    """Per-module lora_alpha.

    - ``scale`` (default): each module keeps the scaling the user chose with ``base``
      (alpha/r, or alpha/sqrt(r) when ``base.use_rslora``), so alpha_w = alpha * r_w / r
      (or alpha * sqrt(r_w / r)).
    - ``rslora``: the same alpha everywhere with rsLoRA's alpha/sqrt(r_w) scaling.
    - ``constant``: the same alpha everywhere with plain alpha/r_w scaling (peft's behaviour
      when no alpha_pattern is given).
    """
    if alpha_policy not in ALPHA_POLICIES:
        raise ValueError(f"alpha_policy must be one of {ALPHA_POLICIES}, got {alpha_policy!r}")
    alpha, r = float(base.lora_alpha), base.r
    if alpha_policy != "scale":
        return {name: alpha for name, rank in ranks.items() if rank > 0}
    if base.use_rslora:
        return {name: alpha * math.sqrt(rank / r) for name, rank in ranks.items() if rank > 0}
    return {name: alpha * rank / r for name, rank in ranks.items() if rank > 0}


def build_lora_config(
    allocation: Allocation, base: peft.LoraConfig | None = None, *, alpha_policy: str = "scale"
) -> peft.LoraConfig:
    """``base`` (default: r = avg_rank, lora_alpha = 2·avg_rank) with the allocation's targets,
    ranks and alphas; rank-0 modules are left out of ``target_modules``."""
    if base is None:
        base = peft.LoraConfig(
            r=allocation.config.avg_rank, lora_alpha=2 * allocation.config.avg_rank
        )
    if base.rank_pattern or base.alpha_pattern:
        warnings.warn("the base LoraConfig's rank_pattern/alpha_pattern are replaced", stacklevel=2)
    ranks = {name: rank for name, rank in allocation.ranks.items() if rank > 0}
    if not ranks:
        raise ValueError("every module has rank 0: there is nothing to adapt")
    rank_pattern, alpha_pattern = lora_patterns(ranks, lora_alphas(ranks, base, alpha_policy))
    return dataclasses.replace(
        base,
        target_modules=list(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=base.use_rslora or alpha_policy == "rslora",
    )


def injected_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """``{base-model module name: rank}`` of every LoRA layer of a peft model."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        name: int(module.r[adapter_name])
        for name, module in root.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    }


def verify_ranks(model: nn.Module, allocation: Allocation, adapter_name: str = "default") -> None:
    """Raise ValueError unless every module got exactly its allocated rank (and no other module
    got an adapter)."""
    got = injected_ranks(model, adapter_name)
    expected = {name: rank for name, rank in allocation.ranks.items() if rank > 0}
    problems = [
        f"{n}: expected rank {r}, got {got.get(n, 'no adapter')}"
        for n, r in expected.items()
        if got.get(n) != r
    ]
    problems += [
        f"{n}: got rank {r} but the allocation gives it none"
        for n, r in got.items()
        if n not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("LoRA ranks differ from the allocation: " + "; ".join(problems[:3]) + more)


def apply_allocation(
    model: nn.Module,
    allocation: Allocation,
    base: peft.LoraConfig | None = None,
    *,
    alpha_policy: str = "scale",
    adapter_name: str = "default",
) -> peft.PeftModel:
    """``get_peft_model`` with the allocation's LoraConfig, after checking the model matches it
    and verifying the injected ranks."""
    allocation.check_model(model)
    config = build_lora_config(allocation, base, alpha_policy=alpha_policy)
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    verify_ranks(peft_model, allocation, adapter_name)
    return peft_model
