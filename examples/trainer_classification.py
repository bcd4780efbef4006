"""transformers' Trainer for sequence classification, with the one-call senslora API.

``senslora.get_peft_model`` measures the ranks on a DataLoader of padded batches and returns an
ordinary ``PeftModel`` (each module at its rank, checked) that Trainer fine-tunes. By default
the shipped MiniLM learns a handful of sentiment sentences for a few steps.

    python examples/trainer_classification.py --max-steps 2
"""

from __future__ import annotations

import argparse
import tempfile

import peft
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import senslora
from senslora.data.assets import minilm_path
from senslora.peft_bridge import injected_ranks

EXAMPLES = [
    ("a warm, funny and moving film", 1),
    ("dull, slow and far too long", 0),
    ("the cast is wonderful", 1),
    ("i walked out after an hour", 0),
] * 4


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an encoder folder (default: MiniLM)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--avg-rank", type=int, default=4)
    args = parser.parse_args(argv)
    folder = args.model or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    rows = Dataset.from_dict({"text": [t for t, _ in EXAMPLES], "label": [y for _, y in EXAMPLES]})
    rows = rows.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    collator = DataCollatorWithPadding(tokenizer)
    calibration = DataLoader(rows.remove_columns(["label"]), batch_size=8, collate_fn=collator)
    lora_config = peft.LoraConfig(
        r=args.avg_rank, lora_alpha=2 * args.avg_rank, task_type="SEQ_CLS"
    )
    peft_model = senslora.get_peft_model(model, lora_config, calibration)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=peft_model,
            args=TrainingArguments(
                output_dir=out,
                max_steps=args.max_steps,
                per_device_train_batch_size=8,
                learning_rate=1e-3,
                report_to=[],
                save_strategy="no",
                use_cpu=not torch.cuda.is_available(),
            ),
            train_dataset=rows,
            data_collator=collator,
        )
        result = trainer.train()
    ranks = injected_ranks(peft_model)
    layers = dict(peft_model.get_base_model().named_modules())
    sizes = {name: layers[name].in_features + layers[name].out_features for name in ranks}
    return {
        "ranks": ranks,
        "train_loss": result.training_loss,
        "adapter_parameters": sum(r * sizes[name] for name, r in ranks.items()),
        "uniform_parameters": sum(args.avg_rank * size for size in sizes.values()),
    }


if __name__ == "__main__":
    print(main())
