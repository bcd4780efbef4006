"""HyperAdaLoRA inside a peft LoRA model: generated factors in place of lora_A / lora_B.

`HyperAdaLora` owns the hypernetwork, the pruning mask and the importance scores. A forward
pre-hook on the wrapped transformers model runs the hypernetwork once per forward pass and hands
every LoRA layer its factors (lora_B = P, lora_A = diag(lambda * mask) Q); a forward hook adds
the orthogonality regulariser to the training loss. `materialise` turns the model back into a
plain peft LoRA model (kept components only) that saves, reloads and merges without any of this.
"""

from __future__ import annotations

import math

import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from senslora.finetune.hyperadalora.budget import Importance, budget_at, top_budget_mask
from senslora.finetune.hyperadalora.hypernet import HyperNetwork, TokenLayout
from senslora.peft_bridge import lora_patterns

ORTH_REG_WEIGHT = 0.1  # peft AdaLoraConfig.orth_reg_weight
ADAPTER = "default"


class GeneratedFactor(nn.Module):
    """Stands in for a LoRA layer's lora_A or lora_B ``nn.Linear``: its weight is generated."""

    def __init__(self, factors: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.factors, self.key = factors, key

    @property
    def weight(self) -> torch.Tensor:
        return self.factors[self.key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class HyperAdaLora(nn.Module):
    """Hypernetwork + pruning state of one peft model (a submodule of the transformers model, so
    the Trainer's optimizer, ``.to()`` and DDP see its parameters)."""

    def __init__(
        self,
        layout: TokenLayout,
        schedule: dict[str, int],
        *,
        target_budget: int,
        total_steps: int,
        width: int,
        residual: bool,
    ) -> None:
        super().__init__()
        self.layout, self.schedule, self.total_steps = layout, schedule, total_steps
        self.target_budget = target_budget
        self.hypernet = HyperNetwork(layout, width=width, residual=residual)
        self.register_buffer("mask", torch.ones(layout.num_tokens))
        self.register_buffer(
            "token_module", layout.token_index(tuple(range(len(layout.names)))), persistent=False
        )
        self.importance = Importance()
        self.factors: dict[str, torch.Tensor] = {}
        self.orth_loss: torch.Tensor | None = None
        self._values: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._cached = False
        self.scaling = 1.0
        self.hooks: list = []

    def generate(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """P columns and Q rows per shape group and the masked lambdas (T,)."""
        p_columns, q_rows, lambdas = self.hypernet()
        return p_columns, q_rows, lambdas * self.mask

    def refresh(self) -> None:
        """Generate every layer's factors (once per forward pass; cached while not training)."""
        training = self.training and torch.is_grad_enabled()
        if self._cached and not training:
            return
        p_columns, q_rows, lambdas = self.generate()
        if training:
            self._track({"lambda": lambdas} | _keyed(p_columns, "p") | _keyed(q_rows, "q"))
            self.orth_loss = orthogonality_loss(
                p_columns, q_rows, self.token_module, self.hypernet.spans
            )
        for (_, start, end, members), p, q in zip(
            self.layout.groups, p_columns, q_rows, strict=True
        ):
            sizes = [self.layout.ranks[i] for i in members]
            scaled_q = lambdas[start:end, None] * q  # diag(lambda * mask) Q
            for i, p_m, q_m in zip(members, p.split(sizes), scaled_q.split(sizes), strict=True):
                name = self.layout.names[i]
                self.factors[f"{name}.B"] = p_m.T  # (d_out, r_m)
                self.factors[f"{name}.A"] = q_m  # (r_m, d_in)
        self._cached = not training

    def _track(self, generated: dict[str, torch.Tensor]) -> None:
        """Keep the values and accumulate the gradients of the generated tensors (importance)."""
        for key, tensor in generated.items():
            self._values[key] = tensor.detach()
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, key=key: self._accumulate(key, grad))

    def _accumulate(self, key: str, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self._grads[key] = self._grads[key] + grad if key in self._grads else grad.clone()

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> None:
        """After optimizer step ``step``: update importance (before the final phase) and re-mask
        to the scheduled budget (AdaLoRA's ``update_and_allocate`` on generated factors)."""
        if self._grads and step < self.total_steps - self.schedule["tfinal"]:
            self.importance.update(self._values, self._grads)
        self._grads = {}
        budget, remask = budget_at(
            step,
            initial=self.layout.num_tokens,
            target=self.target_budget,
            tinit=self.schedule["tinit"],
            tfinal=self.schedule["tfinal"],
            total_steps=self.total_steps,
            delta_t=self.schedule["deltaT"],
        )
        if remask and self.importance.smoothed:
            scores = self.importance.token_scores(len(self.layout.groups)).to(self.mask.device)
            self.mask.copy_(top_budget_mask(scores, budget))
            self._cached = False

    def ranks(self) -> dict[str, int]:
        """Kept components per module."""
        kept = torch.zeros(len(self.layout.names), device=self.mask.device)
        kept.index_add_(0, self.token_module, self.mask)
        return dict(zip(self.layout.names, (int(k) for k in kept.tolist()), strict=True))


def _keyed(tensors: list[torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{g}": t for g, t in enumerate(tensors)}


def orthogonality_loss(p_columns, q_rows, token_module: torch.Tensor, spans) -> torch.Tensor:
    """Mean over adapted matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (peft AdaLoRA's
    regulariser, unweighted), one Gram matrix per shape group masked to its module blocks."""
    total, count = 0.0, 0
    for (start, end), p, q in zip(spans, p_columns, q_rows, strict=True):
        module = token_module[start:end]
        same = module[:, None] == module[None, :]  # (T_g, T_g) block-diagonal
        eye = torch.eye(end - start, device=p.device, dtype=p.dtype)
        for rows in (p, q):  # P columns and Q rows are both stored as (T_g, d) rows
            squared = ((rows @ rows.T - eye) ** 2 * same).sum(dim=1)
            per_module = torch.zeros(int(module.max()) + 1, device=p.device, dtype=p.dtype)
            per_module = per_module.index_add(0, module, squared)[module.unique()]
            total = total + per_module.clamp_min(1e-12).sqrt().sum()
            count += per_module.numel()
    return total / count


def install(peft_model, controller: HyperAdaLora, scaling: float) -> None:
    """Replace every adapted layer's lora_A / lora_B by generated factors (scaling alpha/r of
    every layer: ``scaling``) and hook the controller into the forward pass."""
    model = peft_model.get_base_model()
    model.add_module("hyperadalora", controller)
    for name in controller.layout.names:
        layer = model.get_submodule(name)
        if not isinstance(layer, peft.tuners.lora.LoraLayer):
            raise ValueError(f"{name} is not a LoRA layer")
        layer.lora_A[ADAPTER] = GeneratedFactor(controller.factors, f"{name}.A")
        layer.lora_B[ADAPTER] = GeneratedFactor(controller.factors, f"{name}.B")
        layer.scaling[ADAPTER] = scaling
    controller.scaling = scaling
    controller.hooks = [
        model.register_forward_pre_hook(lambda module, args: controller.refresh()),
        model.register_forward_hook(_add_orthogonality_loss),
    ]


def find_controller(model) -> HyperAdaLora:
    """The controller of a (possibly DDP-wrapped) HyperAdaLoRA peft model."""
    unwrapped = getattr(model, "module", model)
    controller = getattr(unwrapped.get_base_model(), "hyperadalora", None)
    if controller is None:
        raise ValueError("not a HyperAdaLoRA model (or already materialised)")
    return controller


def _add_orthogonality_loss(module, args, output):
    controller = module.hyperadalora
    if module.training and getattr(output, "loss", None) is not None:
        if controller.orth_loss is not None and torch.is_grad_enabled():
            output.loss = output.loss + ORTH_REG_WEIGHT * controller.orth_loss
    return output


@torch.no_grad()
def materialise(peft_model) -> None:
    """Turn ``peft_model`` in place into a plain peft LoRA model: lora_B = P diag(lambda) and
    lora_A = Q over the kept components, rank_pattern/alpha_pattern with alpha = scaling x rank.
    A module with no kept component keeps a rank-1 adapter with zero weights (exact no-op)."""
    controller = find_controller(peft_model)
    scaling = controller.scaling
    p_columns, q_rows, lambdas = controller.generate()
    model = peft_model.get_base_model()
    config = peft_model.peft_config[ADAPTER]
    layout = controller.layout
    kept_ranks = {}
    for (_, start, end, members), p, q in zip(layout.groups, p_columns, q_rows, strict=True):
        sizes = [layout.ranks[i] for i in members]
        pieces = zip(
            members, p.split(sizes), q.split(sizes), lambdas[start:end].split(sizes), strict=True
        )
        for i, p_m, q_m, lambda_m in pieces:
            keep = controller.mask[controller.token_module == i].bool()  # (r_m,)
            rank = max(int(keep.sum()), 1)
            b = (p_m[keep] * lambda_m[keep, None]).T  # (d_out, kept)
            a = q_m[keep]  # (kept, d_in)
            if not keep.any():
                b, a = p_m.new_zeros(p_m.shape[1], 1), q_m.new_zeros(1, q_m.shape[1])
            name = layout.names[i]
            _set_lora(model.get_submodule(name), a, b, rank * scaling)
            kept_ranks[name] = rank
    rank_pattern, alpha_pattern = lora_patterns(
        kept_ranks, {name: rank * scaling for name, rank in kept_ranks.items()}
    )
    config.rank_pattern.update(rank_pattern)
    config.alpha_pattern.update(alpha_pattern)
    for handle in controller.hooks:
        handle.remove()
    del model.hyperadalora


def _set_lora(layer, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    rank = a.shape[0]
    layer.lora_A[ADAPTER] = nn.Linear(a.shape[1], rank, bias=False, device=a.device, dtype=a.dtype)
    layer.lora_B[ADAPTER] = nn.Linear(rank, b.shape[0], bias=False, device=b.device, dtype=b.dtype)
    layer.lora_A[ADAPTER].weight.copy_(a)
    layer.lora_B[ADAPTER].weight.copy_(b)
    layer.r[ADAPTER] = rank
    layer.lora_alpha[ADAPTER] = alpha
    layer.scaling[ADAPTER] = alpha / rank


def initial_rank(avg_rank: int) -> int:
    """AdaLoRA's default initial rank for an average rank: max(avg + 1, 1.5 x avg)."""
    return max(avg_rank + 1, (3 * avg_rank) // 2)


def scale_ranks(ranks: dict[str, int], factor: float, caps: dict[str, int]) -> dict[str, int]:
    """Initial ranks from a starting allocation: ceil(rank x factor), at least 1, at most cap."""
    return {n: min(max(1, math.ceil(r * factor)), caps[n]) for n, r in ranks.items()}


class HyperAdaLoraCallback(TrainerCallback):
    """Updates importance scores and masks after every optimizer step, before the gradients are
    zeroed (step = optimizer steps done)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        find_controller(model).update_and_allocate(state.global_step + 1)
