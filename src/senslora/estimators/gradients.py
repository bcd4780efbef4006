"""Gradient-based estimators of the loss Hessian diagonal: `fisher` and `hutchinson`.

- `fisher`: the empirical Fisher diagonal E_n[(∂L_n/∂W)²], a positive semi-definite stand-in for
  the Hessian near a minimum. ``per_sample=True`` (default) squares one gradient per sample, which
  is the definition; ``per_sample=False`` squares one gradient per batch (cheaper, biased towards
  zero by the averaging inside the batch).
- `hutchinson`: the diagonal of the true loss Hessian, E_z[z ⊙ Hz] with Rademacher probes z, from
  double backward (Bekas et al., 2007). Away from a minimum some entries are negative; the metrics
  take their absolute value by default (see `senslora.metrics.make_nonnegative`).

Only the target weights require grad during collection; everything else is frozen temporarily and
restored afterwards, as are the model's training mode and attention implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from senslora.batches import Batch, LossFn, input_device, split_samples, to_device
from senslora.stats import ModuleStats
from senslora.targets import layer_shape


@contextlib.contextmanager
def _only_targets_trainable(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Double backward needs an attention implementation with second derivatives: use eager."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if current in (None, "eager") or not callable(setter):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(current)


def _checked_loss(loss: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; try float32 or a smaller batch")
    return loss


def _stats(modules, sums, count, estimator) -> dict[str, ModuleStats]:
    return {
        name: ModuleStats(
            name=name,
            shape=layer_shape(module),
            estimator=estimator,
            diagonal=sums[name] / max(count, 1),
            num_tokens=count,
        )
        for name, module in modules.items()
    }


def collect_fisher_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    per_sample: bool = True,
) -> dict[str, ModuleStats]:
    """Empirical Fisher diagonal, averaged over samples (or over batches if not ``per_sample``)."""
    device = input_device(model)
    weights = [m.weight for m in modules.values()]
    sums = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in modules.items()}
    count = 0
    with _only_targets_trainable(model, modules):
        for batch in batches:
            batch = to_device(batch, device)
            for unit in split_samples(batch) if per_sample else [batch]:
                grads = torch.autograd.grad(_checked_loss(loss_fn(model, unit)), weights)
                for name, grad in zip(modules, grads, strict=True):
                    sums[name].add_(grad.float().square())
                count += 1
    return _stats(modules, sums, count, "fisher")


def collect_hutchinson_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    num_probes: int = 8,
    seed: int = 0,
) -> dict[str, ModuleStats]:
    """Hutchinson estimate of the Hessian diagonal, averaged over batches and probes."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes}")
    device = input_device(model)
    weights = [m.weight for m in modules.values()]
    sums = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in modules.items()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    count = 0
    with _only_targets_trainable(model, modules), _eager_attention(model):
        for batch in batches:
            batch = to_device(batch, device)
            loss = _checked_loss(loss_fn(model, batch))
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for probe in range(num_probes):
                probes = [_rademacher(w, generator) for w in weights]
                hvps = torch.autograd.grad(
                    grads, weights, grad_outputs=probes, retain_graph=probe < num_probes - 1
                )
                for name, z, hz in zip(modules, probes, hvps, strict=True):
                    sums[name].add_((z * hz).float())
                count += 1
    return _stats(modules, sums, count, "hutchinson")


def _rademacher(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, weight.shape, generator=generator).mul_(2).sub_(1)
    return signs.to(device=weight.device, dtype=weight.dtype)
