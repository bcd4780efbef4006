"""The allocation does not depend on how the calibration data is batched, ordered or padded,
and the same seed and data give bit-identical results.

Tolerance: statistics agree to rtol 1e-4 (float32 sums in another order, attention over other
padded widths); the integer ranks are identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_bert_with_minilm_tokenizer, tiny_bert, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.batches import right_align_padding
from senslora.cli import app
from senslora.estimators.activation import collect_activation_statistics
from senslora.targets import find_target_modules

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
CONFIG = AllocationConfig(avg_rank=3)


def sequences(count: int = 10, seed: int = 0) -> list[list[int]]:
    """Token id lists of lengths 2..12."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 13, (count,), generator=generator).tolist()
    return [torch.randint(3, 100, (n,), generator=generator).tolist() for n in lengths]


def batched(rows: list[list[int]], size: int, side: str = "right") -> list[dict]:
    """Dict batches of ``size`` sequences, padded (id 0) on ``side`` to the longest of each."""
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):
            begin = width - len(row) if side == "left" else 0
            ids[i, begin : begin + len(row)] = torch.tensor(row)
            mask[i, begin : begin + len(row)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    for name in a:
        assert a[name].num_tokens == b[name].num_tokens
        for key in ("column_values", "diagonal"):
            x, y = getattr(a[name], key), getattr(b[name], key)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"{name}.{key}")
    assert allocate_ranks(a, CONFIG).ranks == allocate_ranks(b, CONFIG).ranks


@pytest.mark.parametrize("model_name", list(MODELS))
def test_batch_size_does_not_matter(model_name):
    model, rows = MODELS[model_name](), sequences()
    reference = collect_statistics(model, batched(rows, 1))
    for size in (3, 10):
        assert_same(reference, collect_statistics(model, batched(rows, size)))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_batch_order_does_not_matter(model_name):
    model, batches = MODELS[model_name](), batched(sequences(), 3)
    assert_same(collect_statistics(model, batches), collect_statistics(model, batches[::-1]))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_padding_side_does_not_matter(model_name):
    model, rows = MODELS[model_name](), sequences()
    right = collect_statistics(model, batched(rows, 4, "right"))
    left = collect_statistics(model, batched(rows, 4, "left"))
    assert_same(right, left)


def test_fisher_does_not_depend_on_batching_or_padding():
    model, rows = tiny_llama(), sequences(6)
    reference = collect_statistics(model, batched(rows, 1), estimator="fisher")
    for batches in (batched(rows, 3), batched(rows, 4, "left")[::-1]):
        assert_same(reference, collect_statistics(model, batches, estimator="fisher"))


@pytest.mark.parametrize(
    ("model_name", "changes"), [("bert", True), ("gpt2", True), ("llama", False)]
)
def test_why_left_padding_is_right_aligned(model_name, changes):
    """Without the alignment, left padding shifts the absolute positions of BERT's and GPT-2's
    real tokens (position ids count from column 0, not from the first real token) and changes
    their statistics; Llama's rotary positions are relative and do not care."""
    model, rows = MODELS[model_name](), sequences()
    modules = find_target_modules(model)
    right = collect_activation_statistics(model, modules, batched(rows, 4, "right"))
    left = collect_activation_statistics(model, modules, batched(rows, 4, "left"))
    differs = any(
        not torch.allclose(right[n].column_values, left[n].column_values, rtol=1e-3, atol=1e-5)
        for n in right
    )
    assert differs == changes


def test_right_align_padding():
    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 5, 6], [7, 8, 9, 1]]),
        "inputs_embeds": torch.arange(8.0).reshape(2, 4, 1),
    }
    aligned = right_align_padding(batch)
    assert aligned["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 1]]
    assert aligned["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert aligned["labels"].tolist() == [[5, 6, -100, -100], [7, 8, 9, 1]]
    assert aligned["inputs_embeds"][0, :, 0].tolist() == [2.0, 3.0, 0.0, 1.0]
    unchanged = [
        {**batch, "position_ids": torch.zeros(2, 4, dtype=torch.long)},  # the caller's positions
        {**batch, "attention_mask": torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]])},  # holes
        {**batch, "extra": torch.zeros(2, 4)},  # a token-shaped tensor of unknown meaning
        (batch["input_ids"],),
    ]
    for other in unchanged:
        assert right_align_padding(other) is other


def test_same_seed_and_data_are_bit_identical():
    model, batches = tiny_gpt2(), batched(sequences(), 4)
    for estimator in ("activation", "fisher"):
        a = collect_statistics(model, batches, estimator=estimator)
        b = collect_statistics(model, batches, estimator=estimator)
        for name in a:
            for key in ("column_values", "diagonal"):
                x, y = getattr(a[name], key), getattr(b[name], key)
                assert (x is None and y is None) or torch.equal(x, y)
        first, second = allocate_ranks(a, CONFIG), allocate_ranks(b, CONFIG)
        assert first.ranks == second.ranks and first.metrics == second.metrics
    h1 = collect_statistics(model, batches[:1], estimator="hutchinson", num_probes=2, seed=3)
    h2 = collect_statistics(model, batches[:1], estimator="hutchinson", num_probes=2, seed=3)
    assert all(torch.equal(h1[n].diagonal, h2[n].diagonal) for n in h1)


def test_cli_twice_writes_the_same_allocation(tmp_path):
    model_dir = save_tiny_bert_with_minilm_tokenizer(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(
        "\n".join(f"sentence {i} on rank allocation " * (1 + i % 4) for i in range(20))
    )
    documents = []
    for run in ("a", "b"):
        args = ["allocate", "--model", model_dir, "--calib", calib, "--out", tmp_path / run]
        args += ["--num-samples", 12, "--seq-len", 24, "--batch-size", 5, "--seed", 3]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        document = json.loads((tmp_path / run / "allocation.json").read_text())
        for volatile in ("created", "calibration_seconds"):
            document["provenance"].pop(volatile)
        document["provenance"]["calibration_config"].pop("source")
        documents.append(document)
    assert documents[0] == documents[1]
