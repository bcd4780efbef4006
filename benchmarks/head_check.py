"""Does a classification baseline train? Pooling x head learning rate, plus the frozen probe.

    PYTHONPATH=src .venv/bin/python benchmarks/head_check.py            # MRPC, ~30 min on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/head_check.py --quick    # tiny random BERT, seconds

A plain training loop (no Trainer), the same for every cell: the shipped MiniLM, LoRA r = 4
(alpha 8) on the 36 encoder matrices, AdamW with weight decay 0.01 (none on biases and
LayerNorm), linear schedule with 6% warm-up, batch 32, 2 epochs on 2,000 training pairs of a GLUE
pair task read from ``--glue-dir``; the adapters at 5e-4, the head at ``--head-lrs``; the dev
metrics after every epoch. Cells: pooling "pooler" ([CLS] through BERT's pooler, what
``AutoModelForSequenceClassification`` does) and "mean" (how the sentence-transformers model was
trained). Reference rows: the frozen-encoder linear probes of
:func:`senslora.finetune.probe.frozen_probe` (joint pair input and siamese features) and the
majority class. Writes ``results/head_check.json`` (``head_check-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import peft
import torch
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, write_results  # noqa: E402

from senslora.finetune.encoding import encode_classification  # noqa: E402
from senslora.finetune.evaluation import classification_metrics  # noqa: E402
from senslora.finetune.heads import load_classifier, optimizer_groups  # noqa: E402
from senslora.finetune.probe import frozen_probe  # noqa: E402
from senslora.finetune.tasks import load_task  # noqa: E402
from senslora.models import load_tokenizer  # noqa: E402
from senslora.targets import find_target_modules  # noqa: E402

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mrpc", choices=("mrpc", "rte"))
    parser.add_argument("--glue-dir", default=str(GLUE_DIR))
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="adapter learning rate")
    parser.add_argument("--head-lrs", type=float, nargs="+", default=[5e-4, 5e-3])
    parser.add_argument("--poolings", nargs="+", default=["pooler", "mean"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 64 examples")
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def tiny_model_folder(folder: Path) -> str:
    """A tiny random BERT with the shipped MiniLM tokenizer (for --quick)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from senslora.data.assets import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def evaluate(model, loader, task) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            labels += batch.pop("labels").tolist()
            logits.append(model(**batch).logits)
    model.train()
    return classification_metrics(task, torch.cat(logits).numpy(), labels)


def train_cell(args, model_path, task, tokenizer, pooling: str, head_lr: float) -> dict:
    """One plain training run; dev metrics after every epoch."""
    torch.manual_seed(args.seed)
    model = load_classifier(model_path, task.num_labels, pooling=pooling)
    targets = list(find_target_modules(model, "all-linear"))
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="SEQ_CLS"
    )
    model = peft.get_peft_model(model, lora)
    collator = DataCollatorWithPadding(tokenizer)
    train_set = encode_classification(tokenizer, task.train, args.max_length)
    dev_set = encode_classification(tokenizer, task.dev["dev"], args.max_length)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=generator,
    )
    dev_loader = torch.utils.data.DataLoader(dev_set, batch_size=64, collate_fn=collator)
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.lr, head_lr, 0.01))
    total = len(train_loader) * args.epochs
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * total), total)
    model.train()
    epochs, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = []
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        scores = evaluate(model, dev_loader, task)
        epochs.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), **scores})
        epochs[-1]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{pooling} head_lr {head_lr:g} epoch {epoch}: {epochs[-1]}", flush=True)
    return {
        "pooling": pooling,
        "head_lr": head_lr,
        "lr": args.lr,
        "targets": len(targets),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.train_limit, args.epochs = 64, 1
            model_path = tiny_model_folder(Path(tmp))
        else:
            from senslora.data.assets import minilm_path

            model_path = str(minilm_path())
        task = load_task(
            f"glue:{args.task}",
            glue_dir=args.glue_dir,
            train_limit=args.train_limit,
            dev_limit=32 if args.quick else None,
        )
        tokenizer = load_tokenizer(model_path)
        dev_labels = [e.label for e in task.dev["dev"]]
        majority = Counter(e.label for e in task.train).most_common(1)[0][0]
        results = {
            "task": task.name,
            "num_train": len(task.train),
            "num_dev": len(dev_labels),
            "main_metric": task.main_metric,
            "settings": vars(args),
            "environment": environment(torch.device("cpu")),
            "majority_class": classification_metrics(
                task, [majority] * len(dev_labels), dev_labels
            ),
            "cells": [],
            "probes": [],
        }
        out = Path(args.out) if args.out else RESULTS_DIR / name_of(args)
        for head_lr in args.head_lrs:  # the harness's cell (pooler, 5e-4) first
            for pooling in args.poolings:
                cell = train_cell(args, model_path, task, tokenizer, pooling, head_lr)
                results["cells"].append(cell)
                write_results(out, results)  # after every cell: a partial run keeps its rows
        for pair_input in ("joint", "siamese"):
            start = time.perf_counter()
            probe = frozen_probe(task, model_path, pooling="mean", pair_input=pair_input)
            probe["seconds"] = round(time.perf_counter() - start, 1)
            print(f"probe {pair_input}: {probe}", flush=True)
            results["probes"].append(probe)
            write_results(out, results)


def name_of(args) -> str:
    return "head_check-quick.json" if args.quick else "head_check.json"


if __name__ == "__main__":
    main()
