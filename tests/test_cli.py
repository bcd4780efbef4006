"""`senslora allocate` through typer's CliRunner: tiny model, then once on the real MiniLM."""

from __future__ import annotations

import json

import peft
import pytest
from conftest import missing_asset, tiny_bert
from transformers import AutoTokenizer
from typer.testing import CliRunner

import senslora
from senslora.cli import app
from senslora.data.assets import minilm_path

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with the shipped MiniLM tokenizer, saved as a local HF folder."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    except FileNotFoundError:
        missing_asset("the MiniLM package is not installed (make setup)")
    folder = tmp_path_factory.mktemp("tiny-bert")
    model = tiny_bert()
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(
        "\n".join(
            f"sentence number {i} is about rank allocation for lora adapters" for i in range(12)
        )
    )
    return path


def run(*args):
    return runner.invoke(app, ["allocate", *map(str, args)])


def test_allocate_writes_loadable_outputs(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = run(
        "--model",
        tiny_model_dir,
        "--calib",
        calib_file,
        "--out",
        out,
        "--num-samples",
        8,
        "--seq-len",
        16,
        "--batch-size",
        4,
        "--avg-rank",
        3,
    )
    assert result.exit_code == 0, result.output
    assert "LoRA ranks" in result.output and "query" in result.output
    assert {p.name for p in out.iterdir()} == {
        "allocation.json",
        "adapter_config.json",
        "ranks.png",
    }
    allocation = senslora.load_allocation(out)
    assert allocation.total_rank == 3 * len(allocation.ranks) == 3 * 12
    assert allocation.provenance["num_sequences"] == 8
    config = peft.LoraConfig.from_pretrained(out)
    assert (
        config.rank_pattern
        == allocation.to_lora_config(peft.LoraConfig(r=3, lora_alpha=6)).rank_pattern
    )
    data = json.loads((out / "allocation.json").read_text())
    assert data["alphas"] == {n: 2.0 * r for n, r in allocation.ranks.items()}
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_existing_results_are_kept_without_overwrite(tiny_model_dir, calib_file, tmp_path):
    args = (
        "--model",
        tiny_model_dir,
        "--calib",
        calib_file,
        "--out",
        tmp_path,
        "--num-samples",
        4,
        "--seq-len",
        8,
    )
    assert run(*args).exit_code == 0
    before = (tmp_path / "allocation.json").read_text()
    result = run(*args, "--avg-rank", 2)
    assert result.exit_code == 2
    assert "--overwrite" in result.output and "Traceback" not in result.output
    assert (tmp_path / "allocation.json").read_text() == before
    assert run(*args, "--avg-rank", 2, "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--estimator", "newton"), "estimator must be one of"),
        (("--targets", "nothing_like_this"), "matched no adaptable module"),
        (("--min-rank", 3, "--max-rank", 2), "max_rank must be >= min_rank"),
        (("--calib", "/no/such/file.txt"), "calibration file not found"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    tiny_model_dir, calib_file, tmp_path, extra, message
):
    args = [
        "--model",
        tiny_model_dir,
        "--calib",
        calib_file,
        "--out",
        tmp_path / "o",
        "--num-samples",
        4,
        "--seq-len",
        8,
        *extra,
    ]
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "allocation.json").exists()


def test_missing_model_path_is_a_clear_error(tmp_path):
    result = run("--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.real_model
def test_allocate_on_the_real_minilm_and_wikipedia(tmp_path):
    try:
        minilm_path()
    except FileNotFoundError as error:
        missing_asset(str(error))
    result = run("--out", tmp_path, "--num-samples", 16, "--seq-len", 64)
    assert result.exit_code == 0, result.output
    allocation = senslora.load_allocation(tmp_path)
    assert len(allocation.ranks) == 36
    assert allocation.config.budget == "parameters"  # the default (the paper's A.2)
    assert 0.95 * allocation.uniform_parameters() <= allocation.num_parameters
    assert allocation.num_parameters <= allocation.uniform_parameters()
    assert allocation.provenance["calibration"] == "wikipedia"
    assert len(set(allocation.ranks.values())) > 2
