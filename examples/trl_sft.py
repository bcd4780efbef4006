"""TRL's SFTTrainer on a causal LM with a senslora LoraConfig.

The ranks are measured on a few calibration texts, then the LoraConfig goes to SFTTrainer as
any peft config would (``peft_config=``). By default a tiny random Llama (built from a config,
with the shipped MiniLM tokenizer) trains for a few steps on a handful of sentences, so that it
runs in seconds; pass ``--model`` for a real causal LM folder.

    python examples/trl_sft.py --max-steps 2
"""

from __future__ import annotations

import argparse
import tempfile

import peft
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

import senslora
from senslora.data.assets import minilm_path

TEXTS = [
    "The river runs past the old mill and into the sea.",
    "A recipe needs flour, water, salt and patience.",
    "The committee met on Tuesday and approved the budget.",
    "Stars are born in clouds of gas and dust.",
] * 4


def load(model_path: str | None):
    if model_path:
        return AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(
            model_path
        )
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.eos_token = tokenizer.sep_token  # a WordPiece tokenizer has no end-of-text token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal LM folder (default: tiny Llama)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--avg-rank", type=int, default=4)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    calibration = [tokenizer(TEXTS[i : i + 4], padding=True, return_tensors="pt") for i in (0, 4)]
    allocation = senslora.compute_allocation(
        model, calibration, peft.LoraConfig(r=args.avg_rank, target_modules="all-linear")
    )
    lora_config = allocation.to_lora_config(
        peft.LoraConfig(r=args.avg_rank, lora_alpha=2 * args.avg_rank, task_type="CAUSAL_LM")
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=out,
                max_steps=args.max_steps,
                per_device_train_batch_size=4,
                learning_rate=1e-3,
                report_to=[],
                save_strategy="no",
                logging_steps=1,
                use_cpu=not torch.cuda.is_available(),
                max_length=32,
            ),
            train_dataset=Dataset.from_dict({"text": TEXTS}),
            processing_class=tokenizer,
            peft_config=lora_config,
        )
        result = trainer.train()
    senslora.verify_ranks(trainer.model, allocation)
    return {
        "ranks": allocation.relative_ranks(),
        "train_loss": result.training_loss,
        "adapter_parameters": allocation.num_parameters,
        "uniform_parameters": allocation.uniform_parameters(),
    }


if __name__ == "__main__":
    print(main())
