"""Task examples -> token features for training and evaluation (padding happens per batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts as a torch Dataset."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def encode_classification(tokenizer, examples: Sequence, max_length: int) -> ListDataset:
    """input_ids / attention_mask (/ token_type_ids) and labels (int, or float for regression)."""
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples]
    if all(t is None for t in texts_b):
        encoded = tokenizer(texts_a, truncation=True, max_length=max_length)
    else:
        encoded = tokenizer(
            texts_a, [t or "" for t in texts_b], truncation="longest_first", max_length=max_length
        )
    features = []
    for i, example in enumerate(examples):
        item = {key: encoded[key][i] for key in encoded}
        item["labels"] = example.label
        features.append(item)
    return ListDataset(features)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model sees it: its chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_generation(tokenizer, examples: Sequence, max_length: int) -> ListDataset:
    """Prompt + response + eos; the loss is on the response only (prompt labels are -100).
    The prompt is cut from the left when the pair is longer than ``max_length``."""
    eos = tokenizer.eos_token_id
    features = []
    for example in examples:
        prompt = prompt_ids(tokenizer, example.prompt)
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [eos]
        response = response[: max_length - 1]
        prompt = prompt[-(max_length - len(response)) :]
        ids = prompt + response
        features.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt) + response,
            }
        )
    return ListDataset(features)


def pad_left(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded (B, T) input_ids and attention_mask, for batched generation."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
