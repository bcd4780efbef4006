"""Allocation <-> peft: a portable LoraConfig with exact per-module ranks, and checks.

An allocation describes a backbone, not one head class: ``bert.encoder.layer.0...`` measured on
``BertForSequenceClassification`` is ``encoder.layer.0...`` in ``BertModel`` and
``0.model.encoder.layer.0...`` in a sentence-transformers model. The LoraConfig therefore names
each module relative to the backbone (the ``base_model_prefix`` stripped), and peft matches every
key as a suffix on a module boundary: ``target_modules`` entries by ``name == key or
name.endswith("." + key)``, ``rank_pattern``/``alpha_pattern`` keys (regex-escaped here) by
``re.match(rf"(.*\\.)?({key})$", name)``. peft silently ignores a pattern key that matches
nothing and uses the first of several that match, so `resolve_modules` checks that every key
matches exactly one module of the model, and `verify_ranks` checks the injected model afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
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
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    key: Callable[[str], str] = pattern_key,
) -> tuple[dict[str, int], dict[str, float]]:
    """peft's ``rank_pattern`` and ``alpha_pattern``: one ``key(name)`` per module
    (`pattern_key`: anchored full names; `suffix_key`: backbone-relative suffixes)."""
    rank_pattern = {key(name): rank for name, rank in ranks.items()}
    return rank_pattern, {key(name): alpha for name, alpha in alphas.items()}


def suffix_key(module_name: str) -> str:
    """The escaped regex that peft's ``(.*\\.)?(key)$`` rule matches against every module whose
    name is ``module_name`` or ends with ``"." + module_name``."""
    return re.escape(module_name)


def backbone_prefix(model: nn.Module) -> str:
    """The dotted path of the backbone inside ``model``: the outermost transformers model's
    ``base_model_prefix`` child (``"bert"`` in ``BertForSequenceClassification``, ``""`` in
    ``BertModel``, ``"0.model"`` in a sentence-transformers model, ``"base_model.model.model"``
    in a peft-wrapped ``LlamaForCausalLM``); ``""`` for a model without one."""
    from transformers import PreTrainedModel

    for path, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            prefix = getattr(module, "base_model_prefix", "") or ""
            child = getattr(module, prefix, None) if prefix else None
            inner = prefix if isinstance(child, nn.Module) and child is not module else ""
            return ".".join(part for part in (path, inner) if part)
    return ""


def relative_name(module_name: str, backbone: str) -> str:
    """``module_name`` without the ``backbone + "."`` prefix (unchanged outside the backbone,
    e.g. a ``classifier`` head)."""
    if backbone and module_name.startswith(backbone + "."):
        return module_name[len(backbone) + 1 :]
    return module_name


def match_modules(keys: Iterable[str], model: nn.Module) -> dict[str, list[str]]:
    """``{key: [names of the modules of model that peft matches with it]}``: a module matches
    when its name equals the key or ends with ``"." + key``."""
    by_suffix: dict[str, list[str]] = defaultdict(list)
    for name, _ in model.named_modules():
        parts = name.split(".") if name else []
        for start in range(len(parts)):
            by_suffix[".".join(parts[start:])].append(name)
    return {key: list(by_suffix.get(key, ())) for key in keys}


def resolve_modules(keys: Iterable[str], model: nn.Module) -> dict[str, str]:
    """``{key: the one module name of model it matches}``; ValueError naming every key that
    matches no module, more than one, or the same module as another key."""
    matches = match_modules(keys, model)
    unmatched = [k for k, names in matches.items() if not names]
    if unmatched:
        raise ValueError(
            f"allocation does not fit this model: it has no module {_some(unmatched, quote=True)}"
            f" (a key matches a module whose name is the key or ends with '.' + key; this "
            f"model's modules are named like {_example_name(model)!r})"
        )
    ambiguous = [f"{k} ({', '.join(names[:2])})" for k, names in matches.items() if len(names) > 1]
    if ambiguous:
        raise ValueError(
            f"allocation does not fit this model: {_some(ambiguous)} match several modules; "
            "apply it to the one backbone it was measured on"
        )
    owner: dict[str, str] = {}
    for key, (name,) in matches.items():
        if name in owner:
            raise ValueError(
                f"allocation does not fit this model: keys {owner[name]} and {key} both "
                f"match {name}"
            )
        owner[name] = key
    return {key: names[0] for key, names in matches.items()}


def _some(items: list[str], limit: int = 3, quote: bool = False) -> str:
    """The first ``limit`` items, joined, and how many more there are."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    shown = [repr(item) if quote else item for item in items[:limit]]
    return ", ".join(shown) + more


def _example_name(model: nn.Module) -> str:
    linear = (n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return next(linear, next((n for n, _ in model.named_modules() if n), ""))


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
    ranks and alphas, keyed by module names relative to the backbone (portable across head
    classes and wrappers); rank-0 modules are left out of ``target_modules``."""
    if base is None:
        base = peft.LoraConfig(
            r=allocation.config.avg_rank, lora_alpha=2 * allocation.config.avg_rank
        )
    if base.rank_pattern or base.alpha_pattern:
        warnings.warn("the base LoraConfig's rank_pattern/alpha_pattern are replaced", stacklevel=2)
    ranks = {name: rank for name, rank in allocation.relative_ranks().items() if rank > 0}
    if not ranks:
        raise ValueError("every module has rank 0: there is nothing to adapt")
    rank_pattern, alpha_pattern = lora_patterns(
        ranks, lora_alphas(ranks, base, alpha_policy), key=suffix_key
    )
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
    got an adapter). Modules are found as peft finds them: by their name relative to the
    backbone, as a suffix."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    got = injected_ranks(model, adapter_name)
    wanted = {key: rank for key, rank in allocation.relative_ranks().items() if rank > 0}
    matches = match_modules(wanted, root)
    problems = [
        f"{key}: expected rank {rank}, got "
        + (", ".join(str(got.get(n, "no adapter")) for n in matches[key]) or "no such module")
        for key, rank in wanted.items()
        if [got.get(n) for n in matches[key]] != [rank]
    ]
    expected = {name for names in matches.values() for name in names}
    problems += [
        f"{n}: got rank {r} but the allocation gives it none"
        for n, r in got.items()
        if n not in expected
    ]
    if problems:
        raise ValueError("LoRA ranks differ from the allocation: " + _some(problems))


def fit_to_model(allocation: Allocation, model: nn.Module) -> Allocation:
    """The allocation, with its backbone inferred from ``model`` when the file did not record
    one (allocations written before the backbone was recorded hold full names such as
    ``bert.encoder...``): if not every name matches ``model`` as it is, but every name starts
    with the model family's ``base_model_prefix``, that prefix is taken as the backbone."""
    if allocation.backbone:
        return allocation
    if all(match_modules(allocation.ranks, model).values()):
        return allocation
    family = _family_prefix(model)
    if family and all(name.startswith(family + ".") for name in allocation.ranks):
        return allocation.with_backbone(family)
    return allocation


def _family_prefix(model: nn.Module) -> str:
    from transformers import PreTrainedModel

    for _, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return getattr(module, "base_model_prefix", "") or ""
    return ""


def apply_allocation(
    model: nn.Module,
    allocation: Allocation,
    base: peft.LoraConfig | None = None,
    *,
    alpha_policy: str = "scale",
    adapter_name: str = "default",
) -> peft.PeftModel:
    """``get_peft_model`` with the allocation's LoraConfig, after checking that every module of
    the allocation matches exactly one module of ``model`` with the same shape, and verifying
    the injected ranks. ``model`` may be any model built on the measured backbone (another head
    class, the bare backbone, a sentence-transformers model)."""
    allocation = fit_to_model(allocation, model)
    allocation.check_model(model)
    config = build_lora_config(allocation, base, alpha_policy=alpha_policy)
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    verify_ranks(peft_model, allocation, adapter_name)
    return peft_model
