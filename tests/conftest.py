"""Tiny random transformers built from configs (no download) and small helpers."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=100,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def missing_asset(reason: str):
    """Skip the test for a missing data set or model package, except in CI (the ``CI``
    environment variable set), where the asset is installed and its absence means a changed
    layout that would otherwise drop the test without a word: there the test fails."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def resize_with_distinct_rows(model, vocab_size: int, seed: int = 0) -> None:
    """``model.resize_token_embeddings(vocab_size)`` with every row drawn at random: the resize
    gives all new rows (every real word of a tokenizer larger than the tiny vocabulary) nearly
    the same mean embedding, and a model that cannot tell its words apart learns nothing."""
    model.resize_token_embeddings(vocab_size)
    generator = torch.Generator().manual_seed(seed)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.copy_(0.5 * torch.randn(embeddings.shape, generator=generator))


def save_tiny_bert_with_minilm_tokenizer(folder):
    """A tiny random BERT with the shipped MiniLM tokenizer, saved as a local HF folder (for the
    CLI); skips the test (fails in CI) when the MiniLM package is not installed."""
    from transformers import AutoTokenizer

    from senslora.data.assets import minilm_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    except (FileNotFoundError, OSError):
        missing_asset("the MiniLM package is not installed (make setup)")
    model = tiny_bert()
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_batches(
    num_batches: int = 2,
    batch: int = 3,
    length: int = 7,
    seed: int = 0,
    pad_side: str = "right",
    vocab: int = 100,
    labels: bool = False,
):
    """Dict batches with random ids and some padded positions (attention_mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        lengths = torch.randint(2, length + 1, (batch,), generator=generator)
        lengths[0] = length
        positions = torch.arange(length).expand(batch, -1)
        if pad_side == "right":
            mask = positions < lengths[:, None]
        else:
            mask = positions >= (length - lengths)[:, None]
        ids = ids.masked_fill(~mask, 0)
        item = {"input_ids": ids, "attention_mask": mask.long()}
        if labels:
            item["labels"] = torch.randint(0, 2, (batch,), generator=generator)
        out.append(item)
    return out


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
