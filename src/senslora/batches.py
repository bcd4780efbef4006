"""Calibration batches as the estimators see them.

A batch is either a dict of tensors for a transformers model (``model(**batch)``; an
``attention_mask`` marks the real tokens) or a tuple/list for a plain torch module, whose first
element is the input (``model(batch[0])``) and the rest are targets for a user ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Batch = Mapping[str, Any] | tuple | list
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor moved to ``device``."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(v.to(device) if torch.is_tensor(v) else v for v in batch)
    raise TypeError(f"a batch must be a dict or a tuple of tensors, got {type(batch).__name__}")


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device for a transformers model (also under
    ``device_map``), else the first parameter's device. Weights offloaded by accelerate sit on
    the meta device; their module's execution device is used instead."""
    get_input = getattr(model, "get_input_embeddings", None)
    if callable(get_input):
        try:
            embeddings = get_input()
        except (AttributeError, NotImplementedError):
            embeddings = None
        if embeddings is not None and getattr(embeddings, "weight", None) is not None:
            return module_device(embeddings, fallback=_hooked_device(model))
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu")
    return module_device(model, fallback=torch.device("cpu"))


def module_device(module: nn.Module, fallback: torch.device | None = None) -> torch.device:
    """The device a module computes on: its weight's, or for a weight offloaded to the meta
    device (accelerate ``device_map``/``cpu_offload``) the execution device of its hook."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(module.parameters(), None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    hooked = _hooked_device(module)
    if hooked is not None:
        return hooked
    return fallback if fallback is not None else torch.device("cpu")


def _hooked_device(module: nn.Module) -> torch.device | None:
    """The ``execution_device`` of an accelerate hook on ``module``, if any."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None:
        return None
    if isinstance(device, int):  # accelerate names GPUs by index
        return torch.device("cuda", device)
    return torch.device(device)


def token_mask(batch: Batch) -> torch.Tensor | None:
    """(B, T) bool mask of real tokens, or None when the batch carries no attention mask."""
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return None


_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "inputs_embeds", "labels")


def right_align_padding(batch: Batch) -> Batch:
    """A left-padded dict batch with each row rolled so that its real tokens come first.

    Models with absolute position embeddings (BERT, GPT-2) number positions from column 0 unless
    given ``position_ids``, so left padding shifts the positions of the real tokens and changes
    their hidden states. With right padding every real token is computed as without padding
    (encoders mask the padded keys, causal decoders never look ahead). Returned unchanged: tuple
    batches, batches without a 2-D mask, with their own ``position_ids``, with another tensor
    shaped like the mask, or with a row whose real tokens are not one contiguous block.
    """
    mask = token_mask(batch)
    if mask is None or mask.dim() != 2 or "position_ids" in batch:
        return batch
    rows, width = mask.shape
    lead = torch.where(mask.any(dim=1), mask.int().argmax(dim=1), 0)  # leading padding per row
    if not bool(lead.any()):
        return batch
    columns = torch.arange(width, device=mask.device)
    index = (columns[None, :] + lead[:, None]) % width  # (B, T): new column j <- old j + lead
    if not torch.equal(mask.gather(1, index), columns[None, :] < mask.sum(dim=1)[:, None]):
        return batch
    aligned = dict(batch)
    for key, value in batch.items():
        if not torch.is_tensor(value) or tuple(value.shape[:2]) != (rows, width):
            continue
        if key not in _TOKEN_KEYS:
            return batch  # a tensor shaped like the tokens that we do not know how to move
        expanded = index.to(value.device).view(rows, width, *[1] * (value.dim() - 2))
        aligned[key] = value.gather(1, expanded.expand_as(value))
    return aligned


def forward(model: nn.Module, batch: Batch, *, with_labels: bool = True) -> Any:
    """Run the model on a batch (dict -> ``model(**batch)``, tuple -> ``model(batch[0])``)."""
    if isinstance(batch, Mapping):
        inputs = batch if with_labels else {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs)
    return model(batch[0])


def batch_size(batch: Batch) -> int:
    """Number of sequences (dict) or samples (tuple) in a batch."""
    first = batch["input_ids"] if isinstance(batch, Mapping) and "input_ids" in batch else None
    if first is None:
        values = batch.values() if isinstance(batch, Mapping) else batch
        first = next(v for v in values if torch.is_tensor(v))
    return int(first.shape[0])


def split_samples(batch: Batch) -> Iterator[Batch]:
    """The batch one sample at a time (size-1 batches), trimming padding columns of dict batches."""
    size = batch_size(batch)
    for i in range(size):
        if isinstance(batch, Mapping):
            sample = {
                k: v[i : i + 1] if torch.is_tensor(v) and v.shape[:1] == (size,) else v
                for k, v in batch.items()
            }
            mask = token_mask(sample)
            if mask is not None and mask.dim() == 2 and bool(mask.any()):
                keep = mask[0]
                sample = {
                    k: v[:, keep]
                    if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == keep.numel()
                    else v
                    for k, v in sample.items()
                }
            yield sample
        else:
            yield type(batch)(v[i : i + 1] if torch.is_tensor(v) else v for v in batch)


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The transformers model's own loss.

    Uses the batch's ``labels``; a causal LM without labels gets the next-token loss on its real
    tokens (padding -> -100). Anything else needs labels or an explicit ``loss_fn``.
    """
    if not isinstance(batch, Mapping):
        raise ValueError("tuple batches need an explicit loss_fn(model, batch) for this estimator")
    if "labels" not in batch:
        if not _is_causal_lm(model):
            raise ValueError(
                f"this estimator needs a loss: batches have keys {sorted(batch)} but no 'labels', "
                f"and {type(model).__name__} is not a causal LM; add labels or pass loss_fn"
            )
        labels = batch["input_ids"].clone()
        mask = token_mask(batch)
        if mask is not None:
            labels[~mask] = -100
        longest = int(mask.sum(dim=-1).max()) if mask is not None else labels.shape[-1]
        if longest < 2:
            raise ValueError(
                "the next-token loss needs sequences of at least 2 real tokens, got a batch whose "
                f"longest sequence has {longest}; drop shorter sequences (min_tokens=2)"
            )
        batch = {**batch, "labels": labels}
    output = model(**batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss; pass loss_fn(model, batch)")
    return loss


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith(
        "LMHeadModel"
    )
