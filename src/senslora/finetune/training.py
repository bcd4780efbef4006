"""One fine-tuning run with transformers' Trainer: method x task x seed -> results.json.

The Trainer brings accelerate, torchrun (DDP) and DeepSpeed unchanged, checkpointing every epoch
and resume. This module knows nothing of sensitivity: `senslora.finetune.methods` builds the peft
model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from senslora import __version__
from senslora.data import CalibrationConfig, calibration_batches
from senslora.files import write_text_atomic
from senslora.finetune.config import TrainConfig
from senslora.finetune.encoding import (
    encode_classification,
    encode_generation,
    pad_left,
    prompt_ids,
)
from senslora.finetune.evaluation import classification_metrics, generation_metrics
from senslora.finetune.hyperadalora import HyperAdaLoraCallback, find_controller, materialise
from senslora.finetune.methods import (
    AdaLoraCallback,
    adalora_ranks,
    prepare_model,
    trainable_parameters,
)
from senslora.finetune.tasks import load_task
from senslora.models import load_model, load_tokenizer, resolve_device, resolve_model_path
from senslora.serialization import load_allocation

logger = logging.getLogger(__name__)
RESULTS = "results.json"


class GenerationTrainer(Trainer):
    """Evaluates by greedy generation on the dev set: BLEU-4, ROUGE-1, ROUGE-L."""

    def __init__(self, *args, dev_examples=(), max_new_tokens=48, gen_tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dev_examples = list(dev_examples)
        self.max_new_tokens = max_new_tokens
        self.gen_tokenizer = gen_tokenizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        hypotheses = generate(
            self.model,
            self.gen_tokenizer,
            [e.prompt for e in self.dev_examples],
            self.max_new_tokens,
            self.args.per_device_eval_batch_size,
        )
        scores = generation_metrics(hypotheses, [e.response for e in self.dev_examples])
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        self.log(metrics)
        return metrics


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without the prompt."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_left(
            [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]], pad_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return outputs


def run_training(
    config: TrainConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune, evaluate every epoch and write ``out_dir/results.json`` (atomically) and the
    final adapter in ``out_dir/adapter``. An interrupted run resumes from its last checkpoint."""
    out_dir = Path(out_dir)
    if (out_dir / RESULTS).exists():
        if not overwrite:
            raise ValueError(f"{out_dir} already holds {RESULTS}; pass --overwrite to redo it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    set_seed(config.seed)
    task = load_task(
        config.task,
        glue_dir=config.glue_dir,
        train_limit=config.train_limit,
        dev_limit=config.dev_limit,
    )
    generation = task.kind == "generation"
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(
        model_path,
        task="causal-lm" if generation else "sequence-classification",
        num_labels=getattr(task, "num_labels", 2),
        device=config.device,
        dtype=config.dtype,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    encode = encode_generation if generation else encode_classification
    train_set = encode(tokenizer, task.train, config.max_length)
    dev_name, dev_examples = next(iter(task.dev.items()))
    eval_sets = {
        name: encode(tokenizer, examples, config.max_length) for name, examples in task.dev.items()
    }
    collator = (
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
        if generation
        else DataCollatorWithPadding(tokenizer)
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * world))
    total_steps = steps_per_epoch * config.epochs

    saved = out_dir / "allocation.json"
    prepared = prepare_model(
        model,
        config,
        task_type="CAUSAL_LM" if generation else "SEQ_CLS",
        calibration_batches=lambda: _calibration(tokenizer, config, task),
        train_batches=lambda: _first_batches(train_set, collator, config.batch_size, 32),
        total_steps=total_steps,
        allocation=load_allocation(saved) if saved.exists() else None,
    )
    if prepared.allocation is not None and not saved.exists():
        prepared.allocation.save(str(saved))
    peft_model = prepared.model

    args = _training_arguments(config, out_dir / "checkpoints", steps_per_epoch, progress)
    callbacks = {"adalora": [AdaLoraCallback()], "hyperadalora": [HyperAdaLoraCallback()]}.get(
        config.method, []
    )
    if config.eval_steps:
        callbacks.append(EvaluateAtEnd())
    common = dict(
        model=peft_model,
        args=args,
        train_dataset=train_set,
        data_collator=collator,
        callbacks=callbacks,
    )
    if generation:
        trainer = GenerationTrainer(
            **common,
            eval_dataset=eval_sets[dev_name],
            dev_examples=dev_examples,
            gen_tokenizer=tokenizer,
            max_new_tokens=config.max_new_tokens,
        )
    else:
        trainer = Trainer(
            **common,
            eval_dataset=eval_sets if len(eval_sets) > 1 else eval_sets[dev_name],
            compute_metrics=lambda p: _classification_scores(task, p),
        )
    resume = any((out_dir / "checkpoints").glob("checkpoint-*"))
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_seconds = time.perf_counter() - train_start

    timings = {"wall": time.perf_counter() - start, "train": train_seconds}
    results = _results(config, task, trainer, prepared, model_path, timings, resume)
    if trainer.is_world_process_zero():
        if config.method == "hyperadalora":
            materialise(peft_model)  # a plain LoRA adapter of the kept components
        peft_model.save_pretrained(out_dir / "adapter")
        write_text_atomic(out_dir / RESULTS, json.dumps(results, indent=2) + "\n")
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return results


class EvaluateAtEnd(TrainerCallback):
    """With step-wise evaluation, also evaluate after the last step."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_evaluate = True
        return control


def _training_arguments(
    config: TrainConfig, output_dir: Path, steps_per_epoch: int, progress: bool
) -> TrainingArguments:
    """Per-epoch evaluation and logging, or every ``eval_steps``; no checkpoints for
    hyperadalora (its hypernetwork is not part of a peft checkpoint: a rerun restarts)."""
    device = resolve_device(config.device)
    schedule = {"eval_strategy": "epoch", "logging_strategy": "epoch"}
    if config.eval_steps:
        schedule = {
            "eval_strategy": "steps",
            "eval_steps": config.eval_steps,
            "logging_strategy": "steps",
            "logging_steps": config.eval_steps,
        }
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        warmup_steps=math.ceil(config.warmup_ratio * steps_per_epoch * config.epochs),
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        **schedule,
        save_strategy="no" if config.method == "hyperadalora" else "epoch",
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        label_names=["labels"],
        use_cpu=device.type == "cpu",
        bf16=config.dtype == "bfloat16" and device.type == "cuda",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _calibration(tokenizer, config: TrainConfig, task):
    calib = CalibrationConfig(
        source="wikipedia" if config.calib == "task" else config.calib,
        num_samples=config.calib_samples,
        seq_len=config.calib_seq_len,
        seed=config.seed,
    )
    texts = None
    if config.calib == "task":
        texts = [getattr(e, "text_a", None) or e.prompt for e in task.train]
    return calibration_batches(tokenizer, calib, texts=texts)


def _first_batches(dataset, collator, batch_size: int, limit: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        yield batch


def _classification_scores(task, prediction) -> dict[str, float]:
    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = logits.squeeze(-1) if task.num_labels == 1 else np.argmax(logits, axis=-1)
    return classification_metrics(task, predictions, prediction.label_ids)


def _evaluations(log_history: list[dict]) -> list[dict[str, float]]:
    """Every evaluation in order: its optimizer step, epoch and every eval_* metric (not runtime
    figures)."""
    rows = []
    for entry in log_history:
        scores = {
            k[len("eval_") :]: v
            for k, v in entry.items()
            if k.startswith("eval_")
            and not k.endswith(("runtime", "per_second", "loss", "steps_per_second"))
        }
        if scores:
            epoch = round(float(entry.get("epoch", 0.0)), 3)
            rows.append({"step": int(entry.get("step", 0)), "epoch": epoch, **scores})
    return rows


def _results(config, task, trainer, prepared, model_path, timings, resumed) -> dict[str, Any]:
    peft_model = prepared.model
    evals = _evaluations(trainer.state.log_history)
    epochs = [{k: v for k, v in row.items() if k != "step"} for row in evals]
    main = _main_key(task, epochs)
    best = max(epochs, key=lambda row: row[main]) if epochs else None
    if prepared.allocation is not None:
        ranks = prepared.allocation.ranks
    elif config.method == "adalora":
        ranks = adalora_ranks(peft_model)
    elif config.method == "hyperadalora":
        ranks = find_controller(peft_model).ranks()
    else:
        ranks = prepared.notes.get("eva_ranks")
    shapes = {
        n: (m.out_features, m.in_features)
        for n, m in peft_model.get_base_model().named_modules()
        if n in (ranks or {}) and hasattr(m, "in_features")
    }
    return {
        "config": config.to_dict(),
        "method": config.method,
        "task": task.name,
        "model": model_path,
        "main_metric": main,
        "num_train": len(task.train),
        "num_dev": {k: len(v) for k, v in task.dev.items()},
        "parameters": {
            "trainable": trainable_parameters(peft_model),
            "lora": sum(
                p.numel()
                for n, p in peft_model.named_parameters()
                if p.requires_grad and "lora_" in n
            ),
            "final_lora": sum(r * sum(shapes.get(n, (0, 0))) for n, r in (ranks or {}).items()),
            "hypernetwork": prepared.notes.get("hypernetwork_parameters", 0),
        },
        "init_ranks": prepared.notes.get("init_ranks"),
        "ranks": ranks,
        "epochs": epochs,
        "evals": evals,
        "train_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "best": best,
        "last": epochs[-1] if epochs else None,
        "train_seconds": round(timings["train"], 2),
        "wall_seconds": round(timings["wall"], 2),
        "peak_memory_mb": _peak_memory_mb(),
        "resumed": resumed,
        "device": str(resolve_device(config.device)),
        "versions": {"senslora": __version__, "torch": torch.__version__},
    }


def _main_key(task, epochs: list[dict]) -> str:
    """The key of the task's main metric in the epoch rows (first dev split for MNLI)."""
    if not epochs:
        return task.main_metric
    for key in epochs[0]:
        if key == task.main_metric or key.endswith("_" + task.main_metric):
            return key
    raise KeyError(f"main metric {task.main_metric!r} missing from {sorted(epochs[0])}")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
