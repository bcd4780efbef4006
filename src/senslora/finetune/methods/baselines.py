"""The methods senslora is compared with: uniform LoRA, the frozen encoder, AdaLoRA,
HyperAdaLoRA and EVA."""

from __future__ import annotations

import dataclasses

import peft
import torch
from transformers import TrainerCallback

from senslora.finetune.heads import is_head_parameter
from senslora.finetune.hyperadalora import (
    HyperAdaLora,
    HyperAdaLoraCallback,
    find_controller,
    initial_rank,
    install,
    materialise,
    scale_ranks,
    token_layout,
)
from senslora.finetune.methods.base import Method, Prepared, trainable_parameters
from senslora.finetune.methods.sensitivity import Sensitivity
from senslora.peft_bridge import lora_patterns
from senslora.targets import layer_shape


class Lora(Method):
    name = "lora"

    def prepare(self, model, ctx):
        return Prepared(peft.get_peft_model(model, ctx.lora_config()))


class FrozenEncoder(Method):
    """The reference row of every table: the untuned encoder frozen, only the task head trained
    (a linear probe of its pooled embeddings, at the head's learning rate). A fine-tuning method
    that does not beat it has not trained. Classification only; saves the head's weights."""

    name = "frozen"
    checkpoints = False  # a plain module, not a peft checkpoint

    def prepare(self, model, ctx):
        if ctx.task_type != "SEQ_CLS":
            raise ValueError(
                f"the frozen-encoder row needs a classification task, got {ctx.task_type}"
            )
        trainable = 0
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_head_parameter(name))
            trainable += parameter.numel() if parameter.requires_grad else 0
        if not trainable:
            raise ValueError("found no classification head to train (expected a 'classifier')")
        return Prepared(model)

    def final_ranks(self, prepared):
        return {}

    def save(self, prepared, folder):
        folder.mkdir(parents=True, exist_ok=True)
        head = {n: p for n, p in prepared.model.state_dict().items() if is_head_parameter(n)}
        torch.save(head, folder / "head.pt")


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after every optimizer step, before the gradients
    are zeroed (it scores parameters with them). Without it AdaLoRA silently trains at its
    initial rank."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        unwrapped = getattr(model, "module", model)  # DDP wraps the model
        unwrapped.base_model.update_and_allocate(state.global_step)


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


class AdaLora(Method):
    name = "adalora"
    regularised_loss = True
    # peft saves an AdaLoRA adapter cut to its rank pattern and without the rank allocator's
    # importance scores: the Trainer cannot load it back into the initial-rank model
    checkpoints = False

    def prepare(self, model, ctx):
        config, base = ctx.config, ctx.lora_config()
        ada = peft.AdaLoraConfig(
            init_r=config.adalora_init_rank or initial_rank(config.avg_rank),
            target_r=config.avg_rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=base.target_modules,
            task_type=base.task_type,
            total_step=ctx.total_steps,
            **adalora_schedule(ctx.total_steps),
        )
        return Prepared(peft.get_peft_model(model, ada), callbacks=[AdaLoraCallback()])

    def final_ranks(self, prepared):
        """Current ranks of an AdaLoRA model: non-zero singular values per module."""
        ranks = {}
        for name, module in prepared.model.get_base_model().named_modules():
            lora_e = getattr(module, "lora_E", None)
            if lora_e is not None and "default" in lora_e:
                ranks[name] = int((lora_e["default"].detach() != 0).sum())
        return ranks


class HyperAdaLoraMethod(Method):
    """LoRA at the initial ranks (scaling alpha/avg_rank everywhere), its lora_A / lora_B then
    replaced by the hypernetwork's generated factors."""

    name = "hyperadalora"
    regularised_loss = True
    checkpoints = False  # the hypernetwork is not part of a peft checkpoint: a rerun restarts

    def prepare(self, model, ctx):
        config = ctx.config
        modules = dict(model.named_modules())
        geometry = {n: layer_shape(modules[n]) for n in ctx.targets}
        shapes = {n: (g.out_features, g.in_features) for n, g in geometry.items()}
        caps = {n: min(shape) for n, shape in shapes.items()}
        init_r = config.adalora_init_rank or initial_rank(config.avg_rank)
        start = None
        if config.hyperadalora_init == "senslora":
            start = Sensitivity().allocate(model, ctx).ranks
            ranks = scale_ranks(start, init_r / config.avg_rank, caps)
        else:
            ranks = {n: min(init_r, caps[n]) for n in ctx.targets}
        layout = token_layout(ranks, shapes)
        scaling = config.alpha / config.avg_rank
        layout_ranks = dict(zip(layout.names, layout.ranks, strict=True))
        rank_pattern, alpha_pattern = lora_patterns(
            layout_ranks, {n: r * scaling for n, r in layout_ranks.items()}
        )
        lora = dataclasses.replace(
            ctx.lora_config(),
            target_modules=list(layout.names),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
        peft_model = peft.get_peft_model(model, lora)
        controller = HyperAdaLora(
            layout,
            adalora_schedule(ctx.total_steps),
            target_budget=min(config.avg_rank * len(ctx.targets), layout.num_tokens),
            total_steps=ctx.total_steps,
            width=config.hyperadalora_width,
            residual=config.hyperadalora_residual,
        ).to(next(model.parameters()).device)
        install(peft_model, controller, scaling)
        report = {
            "init_ranks": layout_ranks,
            "senslora_ranks": start,
            "hypernetwork_parameters": trainable_parameters(controller),
        }
        return Prepared(peft_model, callbacks=[HyperAdaLoraCallback()], report=report)

    def final_ranks(self, prepared):
        return find_controller(prepared.model).ranks()

    def finalize(self, prepared):
        materialise(prepared.model)  # a plain LoRA adapter of the kept components


class Eva(Method):
    """peft's EVA: SVD of the activations of the first training batches initialises lora_A and
    redistributes the ranks (same total)."""

    name = "eva"

    def prepare(self, model, ctx):
        eva_config = dataclasses.replace(
            ctx.lora_config(),
            init_lora_weights="eva",
            eva_config=peft.EvaConfig(rho=ctx.config.eva_rho),
        )
        peft_model = peft.get_peft_model(model, eva_config, low_cpu_mem_usage=True)
        # EVA runs the model on input_ids / attention_mask only
        inputs = [
            {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
            for b in ctx.train_batches()
        ]
        peft.initialize_lora_eva_weights(peft_model, inputs)
        return Prepared(peft_model)
