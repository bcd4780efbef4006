"""A sentence-transformers model (the shipped MiniLM) with a senslora adapter.

The ranks are measured on the SentenceTransformer itself (its forward takes the features dict,
hence ``forward_fn``); the LoraConfig, whose keys are relative to the BERT backbone, is injected
in place, so the model stays a SentenceTransformer and trains with its own trainer.

    python examples/sentence_transformers_lora.py --max-steps 2
"""

from __future__ import annotations

import argparse
import tempfile

import peft
import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
    losses,
)

import senslora
from senslora.data.assets import minilm_path

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument.", 0.9),
    ("A cat sleeps on the sofa.", "The stock market fell today.", 0.0),
    ("Children are playing football.", "Kids play a ball game outside.", 0.8),
    ("The train leaves at noon.", "A recipe for bread.", 0.1),
] * 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--avg-rank", type=int, default=4)
    args = parser.parse_args(argv)
    encoder = SentenceTransformer(str(minilm_path()), device="cpu")
    texts = [text for pair in PAIRS for text in pair[:2]]
    calibration = [encoder.tokenize(texts[i : i + 4]) for i in range(0, len(texts), 4)]
    allocation = senslora.compute_allocation(
        encoder,
        calibration,
        peft.LoraConfig(r=args.avg_rank),
        forward_fn=lambda model, features: model(features),
    )
    lora_config = allocation.to_lora_config(
        peft.LoraConfig(r=args.avg_rank, lora_alpha=2 * args.avg_rank)
    )
    peft.inject_adapter_in_model(lora_config, encoder)  # in place: still a SentenceTransformer
    senslora.verify_ranks(encoder, allocation)
    data = Dataset.from_dict(
        {
            "sentence1": [p[0] for p in PAIRS],
            "sentence2": [p[1] for p in PAIRS],
            "score": [p[2] for p in PAIRS],
        }
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = SentenceTransformerTrainer(
            model=encoder,
            args=SentenceTransformerTrainingArguments(
                output_dir=out,
                max_steps=args.max_steps,
                per_device_train_batch_size=4,
                learning_rate=1e-3,
                report_to=[],
                save_strategy="no",
                use_cpu=not torch.cuda.is_available(),
            ),
            train_dataset=data,
            loss=losses.CosineSimilarityLoss(encoder),
        )
        result = trainer.train()
    embeddings = encoder.encode(["A man is playing a guitar."], convert_to_tensor=True)
    return {
        "backbone": allocation.backbone,
        "ranks": allocation.relative_ranks(),
        "train_loss": result.training_loss,
        "adapter_parameters": allocation.num_parameters,
        "uniform_parameters": allocation.uniform_parameters(),
        "embedding_dim": int(embeddings.shape[-1]),
    }


if __name__ == "__main__":
    print(main())
