"""Bad input: one clear line saying what was expected and what was received, exit status 2 at
the command line, and no partial output files. Each case through the library and, where the
command line reaches it, through `senslora allocate` / `senslora compare`."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    save_tiny_bert_with_minilm_tokenizer,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_batches,
)
from torch import nn
from typer.testing import CliRunner

import senslora
from senslora import AllocationConfig, allocate_ranks, collect_statistics, load_allocation
from senslora.cli import app
from senslora.files import staged_outputs
from senslora.models import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert_with_minilm_tokenizer(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(f"text {i} about the ranks of lora adapters" for i in range(10)))
    return path


def allocate(model_dir, calib, out, *extra):
    args = ["allocate", "--model", model_dir, "--calib", calib, "--out", out]
    args += ["--num-samples", 6, "--seq-len", 12, "--batch-size", 3, *extra]
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    """Exit status 2, no traceback, one `error:` line holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def assert_no_outputs(folder):
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


# ---------------------------------------------------------------------------------------
# calibration data


def test_empty_calibration_set(model_dir, tmp_path):
    with pytest.raises(ValueError, match="calibration set is empty"):
        collect_statistics(tiny_bert(), [])
    padding_only = [
        {k: torch.zeros_like(v) if k == "attention_mask" else v for k, v in b.items()}
        for b in token_batches(num_batches=2)
    ]
    with pytest.raises(ValueError, match="calibration set is empty.*only padding"):
        collect_statistics(tiny_bert(), padding_only)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    result = allocate(model_dir, blank, tmp_path / "out")
    assert_user_error(result, "calibration set is empty", "gave 0 texts")
    assert_no_outputs(tmp_path / "out")


def test_sequences_shorter_than_two_tokens(model_dir, calib, tmp_path):
    one_token = {
        "input_ids": torch.tensor([[5, 0], [6, 0]]),
        "attention_mask": torch.tensor([[1, 0], [1, 0]]),
    }
    with pytest.raises(ValueError, match="at least 2 real tokens, got a batch whose longest"):
        collect_statistics(tiny_llama(), [one_token], estimator="fisher")
    result = allocate(model_dir, calib, tmp_path / "out", "--seq-len", 1)
    assert_user_error(result, "min_tokens must be at most seq_len (1), got 2")
    assert_no_outputs(tmp_path / "out")


def test_unreadable_calibration_file(model_dir, tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b'text\n"never closed\n')
    with pytest.raises(ValueError, match=r"broken\.csv: could not read it as \.csv"):
        senslora.data.load_texts(str(broken))
    assert_user_error(allocate(model_dir, broken, tmp_path / "out"), "could not read it as .csv")
    assert_no_outputs(tmp_path / "out")


def test_nan_activations_name_the_module_and_suggest_float32(model_dir, calib, tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"bert\.encoder\.layer\.1\..*float32"):
        collect_statistics(model, token_batches())
    nan_dir = tmp_path / "nan-model"
    model_with_tokenizer = type(model).from_pretrained(model_dir)
    with torch.no_grad():
        # +inf through the intermediate layer: layer 1's output.dense receives +inf inputs
        # (an inf query weight alone is absorbed by some SDPA kernels)
        model_with_tokenizer.bert.encoder.layer[1].intermediate.dense.weight.fill_(float("inf"))
    model_with_tokenizer.save_pretrained(nan_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (model_dir / name).exists():
            (nan_dir / name).write_bytes((model_dir / name).read_bytes())
    result = allocate(nan_dir, calib, tmp_path / "out")
    assert_user_error(result, "non-finite", "bert.encoder.layer.1.", "float32")
    assert_no_outputs(tmp_path / "out")


# ---------------------------------------------------------------------------------------
# allocation settings


@pytest.mark.parametrize(
    ("config", "cli", "message"),
    [
        ({"avg_rank": 0}, ("--avg-rank", 0), "avg_rank must be a positive integer, got 0"),
        (
            {"avg_rank": 2, "min_rank": 3},
            ("--avg-rank", 2, "--min-rank", 3),
            "min_rank must not exceed avg_rank",
        ),
        (
            {"min_rank": 3, "max_rank": 2},
            ("--min-rank", 3, "--max-rank", 2),
            "max_rank must be >= min_rank",
        ),
        ({"scheme": "xra"}, ("--scheme", "xra"), "scheme must be one of"),
    ],
)
def test_invalid_allocation_settings(model_dir, calib, tmp_path, config, cli, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AllocationConfig(**config)
    assert_user_error(allocate(model_dir, calib, tmp_path / "out", *cli), message)
    assert_no_outputs(tmp_path / "out")


def test_rank_budget_that_the_matrices_cannot_hold(model_dir, calib, tmp_path):
    stats = collect_statistics(tiny_bert(), token_batches())  # 12 matrices, ranks <= 16
    with pytest.raises(ValueError, match=r"rank budget 1200 \(avg_rank 100 x 12 matrices\)"):
        allocate_ranks(stats, AllocationConfig(avg_rank=100, budget="rank"))
    result = allocate(model_dir, calib, tmp_path / "out", "--avg-rank", 100, "--budget", "rank")
    assert_user_error(result, "rank budget 1200", "cannot be met")
    assert_no_outputs(tmp_path / "out")


# ---------------------------------------------------------------------------------------
# targets and layer types


def test_targets_that_match_nothing(model_dir, calib, tmp_path):
    with pytest.raises(ValueError, match="matched no adaptable module"):
        collect_statistics(tiny_bert(), token_batches(), targets=["nothing"])
    result = allocate(model_dir, calib, tmp_path / "out", "--targets", "nothing,either")
    assert_user_error(result, "matched no adaptable module", "bert.encoder.layer.0")


class Int8Linear(nn.Linear):
    """bitsandbytes-like: an nn.Linear subclass whose weight is stored as int8."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        scale = linear.weight.detach().abs().max() / 127
        quantized = (linear.weight.detach() / scale).round().to(torch.int8)
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale, self.bias)


class QuantLinear(nn.Module):
    """GPTQ-like: a linear layer that is not an nn.Linear (packed weight, own forward)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", linear.weight.detach().to(torch.float16))

    def forward(self, x):
        return x @ self.qweight.float().t()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_quantized_linear_subclass_is_calibrated_by_activation_only():
    model = mlp()
    model[0] = Int8Linear(model[0])
    batches = [(torch.randn(5, 4), torch.randn(5, 3))]
    stats = collect_statistics(model, batches)
    assert set(stats) == {"0", "2"} and stats["0"].column_values.shape == (4,)
    with pytest.raises(ValueError, match=r"floating-point weights, but 0 has a torch.int8 weight"):
        collect_statistics(model, batches, estimator="fisher", loss_fn=lambda m, b: m(b[0]).sum())


def test_linear_like_layers_of_other_types_are_skipped_with_a_warning(caplog):
    model = mlp()
    model[0] = QuantLinear(model[0])
    with caplog.at_level(logging.WARNING, logger="senslora.targets"):
        stats = collect_statistics(model, [(torch.randn(5, 4),)])
    assert set(stats) == {"2"}
    assert (
        "skipping 1 linear-like layers that are not nn.Linear/Conv1D (QuantLinear)" in caplog.text
    )
    with pytest.raises(ValueError, match="target 0 is a QuantLinear, expected nn.Linear or Conv1D"):
        collect_statistics(model, [(torch.randn(5, 4),)], targets=["0"])
    only_quantized = nn.Sequential(QuantLinear(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="has no adaptable layers.*found 1 linear-like layers"):
        collect_statistics(only_quantized, [(torch.randn(5, 4),)])
    with pytest.raises(ValueError, match="has no adaptable layers"):
        collect_statistics(nn.Sequential(nn.Tanh()), [(torch.randn(5, 4),)])


def test_offloaded_weights_need_the_activation_estimator(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "llama")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", device_map={"": "disk"}, offload_folder=tmp_path / "offload"
    )
    with pytest.raises(ValueError, match="needs every target weight in memory.*activation"):
        collect_statistics(offloaded, token_batches(num_batches=1), estimator="fisher")


# ---------------------------------------------------------------------------------------
# models and allocation files


def test_missing_or_unreadable_model(calib, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    assert_user_error(allocate(tmp_path / "nope", calib, tmp_path / "out"), "does not exist")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    assert_user_error(allocate(no_config, calib, tmp_path / "out"), "has no config.json")
    truncated = tmp_path / "truncated"
    tiny_bert().save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="could not load the model .*corrupted or truncated"):
        load_model(str(truncated))
    assert_user_error(allocate(truncated, calib, tmp_path / "out"), "could not load the")
    assert_no_outputs(tmp_path / "out")


@pytest.fixture(scope="module")
def allocation_file(tmp_path_factory):
    stats = collect_statistics(tiny_bert(), token_batches())
    folder = tmp_path_factory.mktemp("allocation")
    allocate_ranks(stats, AllocationConfig(avg_rank=3)).save(str(folder))
    return folder / "allocation.json"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda text: text[: len(text) // 2], "is not valid JSON"),
        (lambda text: "", "is not valid JSON"),
        (
            lambda text: text.replace("senslora.allocation", "other.schema"),
            "expected a JSON object with schema",
        ),
        (
            lambda text: text.replace('"schema_version": 1', '"schema_version": 9'),
            "expected schema_version 1, got 9",
        ),
        (
            lambda text: json.dumps({**json.loads(text), "ranks": []}),
            "expected 'ranks' to be an object, got list",
        ),
        (lambda text: text.replace('"trace": ', '"trace": "x", "_": ', 1), "metric 'trace'"),
    ],
)
def test_corrupted_allocation_files(allocation_file, tmp_path, mutate, message):
    bad = tmp_path / "allocation.json"
    bad.write_text(mutate(allocation_file.read_text()))
    with pytest.raises(ValueError, match=message):
        load_allocation(bad)
    result = runner.invoke(
        app, ["compare", str(bad), str(allocation_file), "--out", str(tmp_path / "cmp")]
    )
    assert_user_error(result, message)
    assert_no_outputs(tmp_path / "cmp")


def test_allocation_applied_to_another_model(allocation_file):
    allocation = load_allocation(allocation_file)
    with pytest.raises(
        ValueError, match="it has no module 'bert.encoder.layer.0.attention.self.query'"
    ):
        senslora.apply_allocation(tiny_gpt2(), allocation)
    wider = tiny_bert()
    wider.bert.encoder.layer[0].intermediate.dense = nn.Linear(16, 40)
    with pytest.raises(ValueError, match=r"intermediate.dense is 40x16 here but 24x16"):
        senslora.apply_allocation(wider, allocation)


def test_compare_refuses_allocations_of_different_modules(allocation_file, tmp_path):
    stats = collect_statistics(tiny_gpt2(), token_batches())
    allocate_ranks(stats, AllocationConfig(avg_rank=3)).save(str(tmp_path / "gpt2"))
    result = runner.invoke(app, ["compare", str(allocation_file), str(tmp_path / "gpt2")])
    assert_user_error(result, "the allocations cover different modules")
    missing = runner.invoke(app, ["compare", str(allocation_file), str(tmp_path / "none.json")])
    assert_user_error(missing, "no allocation file at")


# ---------------------------------------------------------------------------------------
# output folders


def test_existing_results_are_refused_without_overwrite(
    model_dir, calib, allocation_file, tmp_path
):
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    (adapter_only / "adapter_config.json").write_text("{}")  # e.g. a trained peft adapter
    assert_user_error(
        allocate(model_dir, calib, adapter_only), "adapter_config.json", "--overwrite"
    )
    assert (adapter_only / "adapter_config.json").read_text() == "{}"
    compare = ["compare", str(allocation_file), str(allocation_file), "--out", str(tmp_path / "c")]
    assert runner.invoke(app, compare).exit_code == 0
    before = (tmp_path / "c" / "comparison.json").read_text()
    assert_user_error(runner.invoke(app, compare), "comparison.json", "--overwrite")
    assert (tmp_path / "c" / "comparison.json").read_text() == before
    assert runner.invoke(app, [*compare, "--overwrite"]).exit_code == 0


def assert_stopped_by_a_full_disk(result):
    """The run stopped on the injected OSError (errno 28), not on some other crash: either the
    one-line user error or, while the CLI does not count OSError among its user errors, that
    very exception."""
    if result.exit_code == 2:
        assert_user_error(result, "No space left on device")
    else:
        assert isinstance(result.exception, OSError), result.output
        assert result.exception.errno == 28, result.exception


def test_a_failure_while_writing_leaves_nothing_half_written(
    model_dir, calib, tmp_path, monkeypatch
):
    import senslora.report

    def broken_plot(*args, **kwargs):
        raise OSError(28, "No space left on device")

    fresh = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        patch.setattr(senslora.report, "plot_ranks", broken_plot)
        result = allocate(model_dir, calib, fresh)
    assert_stopped_by_a_full_disk(result)
    assert not fresh.exists()  # created by the run, removed again

    kept = tmp_path / "kept"
    assert allocate(model_dir, calib, kept).exit_code == 0
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(senslora.report, "plot_ranks", broken_plot)
        again = allocate(model_dir, calib, kept, "--avg-rank", 2, "--overwrite")
    assert_stopped_by_a_full_disk(again)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_a_full_disk_is_a_one_line_user_error(model_dir, calib, tmp_path, monkeypatch):
    import senslora.report

    def broken_plot(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(senslora.report, "plot_ranks", broken_plot)
    result = allocate(model_dir, calib, tmp_path / "out")
    assert_user_error(result, "No space left on device")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("interruption", [OSError("disk vanished"), KeyboardInterrupt()])
def test_an_interruption_between_renames_restores_the_previous_files(
    tmp_path, monkeypatch, interruption
):
    names = ("a.json", "b.json", "c.png")
    out = tmp_path / "out"
    with staged_outputs(out, names) as staging:
        for name in names:
            (staging / name).write_text(f"old {name}")
    real_replace, calls = os.replace, []

    def replace_then_fail(source, target):
        calls.append(target)
        if len(calls) == 4:  # a.json moved in, b.json moved aside: fail before the new b.json
            raise interruption
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(type(interruption)):
        with staged_outputs(out, names) as staging:
            for name in names:
                (staging / name).write_text(f"new {name}")
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all((out / name).read_text() == f"old {name}" for name in names)
