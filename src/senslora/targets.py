"""Which modules of a model get an adapter: model -> {full module name: module}.

Adaptable layers are `torch.nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored
transposed as (d_in, d_out)). Selection follows peft's conventions:

- ``"all-linear"``: every adaptable layer except the heads;
- a list of names: a module matches a name if its full name equals it or ends with ``"." + name``
  (so ``["query", "value"]`` selects every attention query and value projection);
- any other string: a regular expression matched against the full name with `re.fullmatch`.

Heads (the output embedding / ``lm_head``, ``classifier``, ``score``, ``pooler`` ...) are
task-specific or tied to the vocabulary; they are excluded unless ``include_heads=True``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

TargetSpec = str | Sequence[str]

logger = logging.getLogger(__name__)

HEAD_NAMES = frozenset(
    {"lm_head", "classifier", "score", "qa_outputs", "pooler", "cls", "pre_classifier", "embed_out"}
)


@dataclass(frozen=True)
class LayerShape:
    """The geometry of one adaptable layer."""

    out_features: int
    in_features: int
    transposed: bool  # True for Conv1D, whose weight is (d_in, d_out)

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


def layer_shape(module: nn.Module) -> LayerShape:
    """The (d_out, d_in) geometry of a Linear or Conv1D module."""
    if isinstance(module, nn.Linear):
        return LayerShape(module.out_features, module.in_features, transposed=False)
    if Conv1D and isinstance(module, Conv1D):
        return LayerShape(module.nf, module.nx, transposed=True)
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types a LoRA adapter can wrap here (Linear, Conv1D)."""
    return isinstance(module, nn.Linear) or bool(Conv1D and isinstance(module, Conv1D))


def looks_linear(module: nn.Module) -> bool:
    """A layer that is linear in spirit but not a Linear/Conv1D subclass (e.g. a custom
    quantized layer with ``in_features``/``out_features``), and not a wrapper around one."""
    if is_adaptable(module):
        return False
    for keys in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        if all(isinstance(getattr(module, key, None), int) for key in keys):
            return not any(is_adaptable(child) for child in module.modules())
    return False


def head_module_names(
    model: nn.Module, named: Sequence[tuple[str, nn.Module]] | None = None
) -> set[str]:
    """Full names of the head modules: the output embedding and conventionally named heads.
    ``named``: ``list(model.named_modules())`` when the caller already has it."""
    heads = set()
    output_embeddings = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            output_embeddings = get_output()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    for name, module in model.named_modules() if named is None else named:
        parts = name.split(".")
        if module is output_embeddings or parts[0] in HEAD_NAMES or parts[-1] in HEAD_NAMES:
            heads.add(name)
        elif any(name.startswith(head + ".") for head in heads):
            heads.add(name)
    return heads


def _matches(name: str, targets: TargetSpec) -> bool:
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(
    model: nn.Module, targets: TargetSpec = "all-linear", *, include_heads: bool = False
) -> dict[str, nn.Module]:
    """The adaptable modules selected by ``targets``, keyed by full module name, in model order.

    Raises ValueError if nothing matches, naming what was asked and a few adaptable names.
    """
    if not isinstance(targets, str) and (
        not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(
            "targets must be 'all-linear', a regex string or a list of module names, "
            f"got {targets!r}"
        )
    named = list(model.named_modules())  # one walk of the model for the three passes below
    heads = set() if include_heads else head_module_names(model, named)
    adaptable = {
        name: module
        for name, module in named
        if name and is_adaptable(module) and name not in heads
    }
    _check_unadaptable(named, model, targets, heads, found_adaptable=bool(adaptable))
    selected = {name: module for name, module in adaptable.items() if _matches(name, targets)}
    if not selected:
        examples = ", ".join(list(adaptable)[:4])
        raise ValueError(
            f"target pattern {targets!r} matched no adaptable module; adaptable modules look like: "
            f"{examples}"
        )
    return selected


def _check_unadaptable(
    named: Sequence[tuple[str, nn.Module]],
    model: nn.Module,
    targets: TargetSpec,
    heads: set[str],
    *,
    found_adaptable: bool,
) -> None:
    """Linear-like layers that are not nn.Linear/Conv1D (custom quantized layers) cannot get an
    adapter: an error when asked for by name or regex, a warning under ``all-linear``."""
    unadaptable = {
        name: type(module).__name__
        for name, module in named
        if name and name not in heads and looks_linear(module)
    }
    asked = [n for n in unadaptable if targets != "all-linear" and _matches(n, targets)]
    if asked:
        raise ValueError(
            f"target {asked[0]} is a {unadaptable[asked[0]]}, expected nn.Linear or Conv1D (or a "
            "subclass, like bitsandbytes' Linear8bitLt/Linear4bit): it cannot get a LoRA adapter"
        )
    if not found_adaptable:
        found = (
            f"; found {len(unadaptable)} linear-like layers of other types" if unadaptable else ""
        )
        raise ValueError(
            f"{type(model).__name__} has no adaptable layers "
            f"(nn.Linear or Conv1D outside the heads){found}"
        )
    if unadaptable and targets == "all-linear":
        kinds = sorted(set(unadaptable.values()))
        logger.warning(
            "skipping %d linear-like layers that are not nn.Linear/Conv1D (%s), e.g. %s: they "
            "get no adapter",
            len(unadaptable),
            ", ".join(kinds),
            next(iter(unadaptable)),
        )
