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
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from senslora.data import CalibrationConfig, calibration_batches
from senslora.files import write_text_atomic
from senslora.finetune.config import TrainConfig
from senslora.finetune.encoding import (
    encode_classification,
    encode_generation,
)
from senslora.finetune.evaluation import (
    classification_metrics,
)
from senslora.finetune.generation import GenerationTrainer
from senslora.finetune.heads import fit_target_stats, load_classifier, optimizer_groups
from senslora.finetune.methods import METHODS, RunContext, target_names
from senslora.finetune.progress import RichProgress, quiet_libraries
from senslora.finetune.results import reset_peak_memory, run_results, stall_message
from senslora.finetune.tasks import load_task
from senslora.models import load_model, load_tokenizer, resolve_device, resolve_model_path
from senslora.pipeline import Calibration
from senslora.serialization import load_allocation

logger = logging.getLogger(__name__)
RESULTS = "results.json"


@dataclass
class LoadedRun:
    """The task, tokenizer, model and encoded data of one run, before any method touches it."""

    task: Any
    model_path: str
    tokenizer: Any
    model: Any
    train_set: list
    eval_sets: dict[str, list]
    collator: Any
    steps_per_epoch: int

    @property
    def generation(self) -> bool:
        return self.task.kind == "generation"


def run_training(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Fine-tune, evaluate every epoch and write ``out_dir/results.json`` (atomically) and the
    final adapter in ``out_dir/adapter``. An interrupted run resumes from its last checkpoint; a
    run that fails before its first checkpoint leaves no folder behind.

    ``progress`` shows one progress bar (loss, latest dev metric); ``verbose`` shows the
    Trainer's own bars and logs and the libraries' warnings instead."""
    out_dir = Path(out_dir)
    if (out_dir / RESULTS).exists():
        if not overwrite:
            raise ValueError(f"{out_dir} already holds {RESULTS}; pass --overwrite to redo it")
        shutil.rmtree(out_dir)
    created = not out_dir.exists()
    try:
        with quiet_libraries(verbose):
            return _train(config, out_dir, progress, verbose)
    except BaseException:
        if created and not any((out_dir / "checkpoints").glob("checkpoint-*")):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _resumable(checkpoints: Path, method) -> bool:
    """Whether the run resumes from a checkpoint. A method whose checkpoints cannot be resumed
    restarts: checkpoints left by an older version are removed (with a warning)."""
    found = any(checkpoints.glob("checkpoint-*"))
    if found and not method.checkpoints:
        logger.warning(
            "%s cannot resume from a checkpoint; removing %s and training from the start",
            method.name,
            checkpoints,
        )
        shutil.rmtree(checkpoints)
        return False
    return found


def _train(config: TrainConfig, out_dir: Path, progress: bool, verbose: bool) -> dict:
    start = time.perf_counter()
    memory_scope = reset_peak_memory()
    set_seed(config.seed)
    run = load_run(config)
    method = METHODS[config.method]
    saved = out_dir / "allocation.json"
    prepared = method.prepare(run.model, _context(config, run, saved))
    out_dir.mkdir(parents=True, exist_ok=True)
    if prepared.allocation is not None and not saved.exists():
        prepared.allocation.save(str(saved))
    trainer = _trainer(config, run, prepared, method, out_dir)
    _show_progress(trainer, config, run, progress, verbose)
    resume = _resumable(out_dir / "checkpoints", method)
    start_eval = None  # step 0: for LoRA-family methods (B = 0) the untuned model
    if config.eval_at_start and not resume:
        start_eval = {**trainer.evaluate(), "step": 0, "epoch": 0.0}
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    timings = {"wall": time.perf_counter() - start, "train": time.perf_counter() - train_start}
    history = ([start_eval] if start_eval else []) + trainer.state.log_history
    results = run_results(
        config, run, history, method, prepared, timings, resume, memory_scope=memory_scope
    )
    if trainer.is_world_process_zero():
        if results["stalled"]:  # once, not once per process
            logger.warning(stall_message(results))
        method.finalize(prepared)
        method.save(prepared, out_dir / "adapter")
        write_text_atomic(out_dir / RESULTS, json.dumps(results, indent=2) + "\n")
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return results


def load_run(config: TrainConfig) -> LoadedRun:
    """Read the task, load the tokenizer and model, encode the splits."""
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
    model = _load_model(config, model_path, task)
    if getattr(model, "config", None) is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    encode = encode_generation if generation else encode_classification
    collator = (
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
        if generation
        else DataCollatorWithPadding(tokenizer)
    )
    train_set = encode(tokenizer, task.train, config.max_length)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return LoadedRun(
        task=task,
        model_path=model_path,
        tokenizer=tokenizer,
        model=model,
        train_set=train_set,
        eval_sets={
            name: encode(tokenizer, examples, config.max_length)
            for name, examples in task.dev.items()
        },
        collator=collator,
        steps_per_epoch=math.ceil(len(train_set) / (config.batch_size * world)),
    )


def _load_model(config: TrainConfig, model_path: str, task):
    """The model's own head (``pooling="model"``), or a linear head on the chosen pooling
    (`senslora.finetune.heads`) with standardised targets for regression when asked."""
    if task.kind == "generation" or config.pooling == "model":
        return load_model(
            model_path,
            task="causal-lm" if task.kind == "generation" else "sequence-classification",
            num_labels=getattr(task, "num_labels", 2),
            device=config.device,
            dtype=config.dtype,
        )
    targets = None
    if task.num_labels == 1 and config.standardize_targets:
        targets = fit_target_stats([example.label for example in task.train])
    return load_classifier(
        model_path,
        task.num_labels,
        pooling=config.pooling,
        targets=targets,
        device=config.device,
        dtype=config.dtype,
    )


def _optimizer(config: TrainConfig, model) -> tuple:
    """(AdamW over the head at its own rate and the rest at the adapters', None) when a head
    learning rate is set; (None, None) lets the Trainer build its own."""
    if config.head_learning_rate is None:
        return None, None
    groups = optimizer_groups(
        model, config.learning_rate, config.head_learning_rate, config.weight_decay
    )
    return torch.optim.AdamW(groups, lr=config.learning_rate), None


def _context(config: TrainConfig, run: LoadedRun, saved: Path) -> RunContext:
    return RunContext(
        config=config,
        task_type="CAUSAL_LM" if run.generation else "SEQ_CLS",
        targets=target_names(run.model, config.targets),
        total_steps=run.steps_per_epoch * config.epochs,
        calibration_batches=lambda: _calibration(run.tokenizer, config, run.task),
        calibration=_calibration_source(config, run.task),
        train_batches=lambda: list(
            _first_batches(run.train_set, run.collator, config.batch_size, 32)
        ),
        labelled_batches=lambda: _labelled_sample(run, config),
        model_path=run.model_path,
        saved_allocation=load_allocation(saved) if saved.exists() else None,
    )


def _trainer(config, run: LoadedRun, prepared, method, out_dir: Path) -> Trainer:
    args = _training_arguments(
        config,
        out_dir / "checkpoints",
        run.steps_per_epoch,
        method.checkpoints,
        token_loss=run.generation,
    )
    callbacks = list(prepared.callbacks)
    if config.eval_steps:
        callbacks.append(EvaluateAtEnd())
    common = dict(
        model=prepared.model,
        optimizers=_optimizer(config, prepared.model),
        args=args,
        train_dataset=run.train_set,
        data_collator=run.collator,
        callbacks=callbacks,
    )
    dev_name, dev_examples = next(iter(run.task.dev.items()))
    if run.generation:
        return GenerationTrainer(
            **common,
            eval_dataset=run.eval_sets[dev_name],
            dev_examples=dev_examples,
            gen_tokenizer=run.tokenizer,
            max_new_tokens=config.max_new_tokens,
        )
    return Trainer(
        **common,
        eval_dataset=run.eval_sets if len(run.eval_sets) > 1 else run.eval_sets[dev_name],
        compute_metrics=lambda p: _classification_scores(run.task, p),
    )


def _show_progress(trainer: Trainer, config, run: LoadedRun, progress: bool, verbose: bool):
    """The Trainer's tqdm bars and printed log dictionaries only when ``verbose``; else one
    `RichProgress` bar (or nothing without ``progress``)."""
    if verbose:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if progress:
        description = f"{config.method} on {run.task.name} (seed {config.seed})"
        trainer.add_callback(RichProgress(description, run.task.main_metric))


class EvaluateAtEnd(TrainerCallback):
    """With step-wise evaluation, also evaluate after the last step."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_evaluate = True
        return control


def _training_arguments(
    config: TrainConfig,
    output_dir: Path,
    steps_per_epoch: int,
    checkpoints: bool = True,
    *,
    token_loss: bool = False,
) -> TrainingArguments:
    """Per-epoch evaluation and logging, or every ``eval_steps``; a checkpoint every epoch for
    the methods whose state a peft checkpoint holds.

    ``token_loss``: the model's loss is a sum over tokens divided by the Trainer's token count
    (causal LM), which the Trainer then counts over every process. Otherwise (classification:
    a per-example mean that ignores that count) the count is not shared: the Trainer would
    multiply the loss by the number of processes, doubling the gradients of a two-process run
    (and changing what gradient clipping does) and the logged training loss."""
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
        save_strategy="epoch" if checkpoints else "no",
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        label_names=["labels"],
        use_cpu=device.type == "cpu",
        bf16=config.mixed_precision == "bf16"
        or (config.dtype == "bfloat16" and device.type == "cuda"),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        average_tokens_across_devices=token_loss,
    )


def _calibration(tokenizer, config: TrainConfig, task):
    calib = _calibration_config(config)
    texts = None
    if config.calib == "task":
        texts = [getattr(e, "text_a", None) or e.prompt for e in task.train]
    return calibration_batches(tokenizer, calib, texts=texts)


def _calibration_source(config: TrainConfig, task) -> Calibration:
    if config.calib == "task":
        return Calibration(description=f"{task.name} training texts")
    return Calibration(config=_calibration_config(config))


def _calibration_config(config: TrainConfig) -> CalibrationConfig:
    return CalibrationConfig(
        source="wikipedia" if config.calib == "task" else config.calib,
        num_samples=config.calib_samples,
        seq_len=config.calib_seq_len,
        seed=config.seed,
    )


def _labelled_sample(run: LoadedRun, config: TrainConfig, batch_size: int = 8) -> list[dict]:
    """``calib_samples`` training examples with their labels, drawn with the run's seed, in
    padded batches: what a task-aware estimator (fisher) calibrates on."""
    count = min(config.calib_samples, len(run.train_set))
    chosen = sorted(random.Random(config.seed).sample(range(len(run.train_set)), count))
    examples = [run.train_set[i] for i in chosen]
    return [
        run.collator(examples[start : start + batch_size])
        for start in range(0, len(examples), batch_size)
    ]


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
