"""The `activation` estimator: the GPTQ layer-wise Hessian from forward hooks (paper, Section 4.6).

For a linear layer y = W x with squared-error reconstruction loss, the Hessian with respect to one
row of W is H = 2·XXᵀ, with X the (d_in, tokens) matrix of the layer's inputs (Frantar et al.,
2022, as used by the paper). Every output row shares it, so the diagonal entry of weight (i, j) is
2·Σ_t x_tj²: one value per input column. No labels and no backward pass are needed; padding tokens
are masked out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from senslora.batches import (
    Batch,
    forward,
    input_device,
    module_device,
    to_device,
    token_mask,
)
from senslora.statistics import ModuleStats
from senslora.targets import layer_shape


class _StopForward(Exception):
    """Raised from the last hook of a forward pass once every target module has been seen."""


class ActivationAccumulator:
    """Running sums of 2·x_j² (and optionally 2·XXᵀ) over the real tokens of one layer's input."""

    def __init__(self, in_features: int, device: torch.device, keep_gram: bool = False):
        self.column_sums = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
            if keep_gram
            else None
        )
        self.num_tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Accumulate one batch of inputs x (..., d_in); mask (B, T) selects the real tokens."""
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device)]  # (B, T, d_in) -> (real tokens, d_in)
        else:
            x = x.reshape(-1, x.shape[-1])  # (..., d_in) -> (tokens, d_in)
        x = x.float()
        self.column_sums.add_(x.square().sum(dim=0), alpha=2.0)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x, alpha=2.0)
        self.num_tokens += x.shape[0]


def collect_activation_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Batch],
    *,
    keep_gram: bool = False,
    autocast_dtype: torch.dtype | None = None,
    stop_early: bool = True,
) -> dict[str, ModuleStats]:
    """Accumulate the activation Hessian diagonal of every module over the calibration batches.

    With ``stop_early`` the forward pass is cut after the last hooked call (counted on the first
    batch), so heads after the last target module (e.g. a large ``lm_head``) are never computed.
    """
    device = input_device(model)
    accumulators = {
        name: ActivationAccumulator(
            layer_shape(m).in_features, _module_device(m, device), keep_gram
        )
        for name, m in modules.items()
    }
    state = {"mask": None, "calls": 0, "limit": None}

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            accumulators[name].add(inputs[0].detach(), state["mask"])
            state["calls"] += 1
            if state["limit"] is not None and state["calls"] >= state["limit"]:
                raise _StopForward

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            for batch in batches:
                batch = to_device(batch, device)
                state["mask"], state["calls"] = token_mask(batch), 0
                try:
                    forward(model, batch, with_labels=False)
                except _StopForward:
                    pass
                if stop_early and state["limit"] is None:
                    state["limit"] = state["calls"]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {
        name: ModuleStats(
            name=name,
            shape=layer_shape(modules[name]),
            estimator="activation",
            column_values=acc.column_sums,
            gram=acc.gram,
            num_tokens=acc.num_tokens,
        )
        for name, acc in accumulators.items()
    }


def _module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """Where the module's inputs arrive: its weight's device, or for a weight offloaded by
    accelerate (meta device) the execution device of its hook."""
    return module_device(module, fallback)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)
