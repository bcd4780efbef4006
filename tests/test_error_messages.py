"""Error paths of the library that no other test reaches, each asserting its message: what was
expected and what was received (batches, gradient estimators, model loading, peft bridge,
calibration data, distributed helpers)."""

from __future__ import annotations

import types

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_batches
from torch import nn

from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.batches import default_loss, to_device
from senslora.data import calibration
from senslora.distributed import distributed_world, shard_batches
from senslora.estimators.gradients import _checked_loss, collect_hutchinson_statistics
from senslora.models import (
    builtin_model_path,
    convert_gguf,
    load_model,
    resolve_device,
    resolve_dtype,
)
from senslora.peft_bridge import build_lora_config, lora_alphas
from senslora.targets import find_target_modules

# ---------------------------------------------------------------------------------------
# batches and losses


def test_a_batch_of_another_type_is_refused():
    with pytest.raises(TypeError, match="a batch must be a dict or a tuple of tensors, got str"):
        to_device("input_ids", torch.device("cpu"))


def test_default_loss_needs_labels_or_a_causal_lm():
    batch = token_batches(num_batches=1)[0]
    with pytest.raises(ValueError, match="tuple batches need an explicit loss_fn"):
        default_loss(tiny_bert(), (batch["input_ids"],))
    with pytest.raises(
        ValueError,
        match=r"no 'labels', and BertForSequenceClassification is not a causal LM; add labels",
    ):
        default_loss(tiny_bert(), batch)


def test_default_loss_refuses_a_model_without_a_loss():
    class NoLoss(nn.Module):
        def forward(self, input_ids, labels=None, attention_mask=None):
            return types.SimpleNamespace(loss=None)

    batch = {**token_batches(num_batches=1)[0], "labels": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match="NoLoss returned no loss; pass loss_fn"):
        default_loss(NoLoss(), batch)


def test_a_loss_fn_must_return_a_finite_scalar():
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got tensor\(\["):
        _checked_loss(torch.ones(2))
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor, got 1.0"):
        _checked_loss(1.0)
    with pytest.raises(FloatingPointError, match="the loss is nan; try float32"):
        _checked_loss(torch.tensor(float("nan")))


def test_a_non_finite_loss_stops_the_gradient_estimators():
    model = tiny_llama()
    batches = token_batches(num_batches=1)
    with pytest.raises(FloatingPointError, match="the loss is inf"):
        collect_statistics(
            model, batches, estimator="fisher", loss_fn=lambda m, b: torch.tensor(float("inf"))
        )


def test_hutchinson_needs_a_probe():
    model = tiny_llama()
    with pytest.raises(ValueError, match="num_probes must be a positive integer, got 0"):
        collect_hutchinson_statistics(
            model, find_target_modules(model), [], default_loss, num_probes=0
        )


# ---------------------------------------------------------------------------------------
# models


def test_device_dtype_and_task_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' .*got 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"dtype must be one of \[.*'float32'.*\], got 'fp8'"):
        resolve_dtype("fp8")
    missing = tmp_path / "no-model"  # the argument errors come first
    with pytest.raises(ValueError, match=r"task must be one of .*, got 'translate'"):
        load_model(str(missing), task="translate")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(str(missing), dtype="fp8")


def test_builtin_models_and_gguf_paths():
    with pytest.raises(
        ValueError, match=r"built-in models are \('minilm', 'smollm2'\), got 'gpt5'"
    ):
        builtin_model_path("gpt5")
    with pytest.raises(FileNotFoundError, match="GGUF file /nowhere/model.gguf does not exist"):
        convert_gguf("/nowhere/model.gguf", "/nowhere/out")


# ---------------------------------------------------------------------------------------
# peft bridge


def test_unknown_alpha_policy_and_nothing_to_adapt():
    base = peft.LoraConfig(r=2, lora_alpha=4)
    with pytest.raises(
        ValueError,
        match=r"alpha_policy must be one of \('scale', 'rslora', 'constant'\), got 'linear'",
    ):
        lora_alphas({"a": 2}, base, "linear")
    stats = collect_statistics(tiny_bert(), token_batches(num_batches=1))
    allocation = allocate_ranks(stats, AllocationConfig(avg_rank=2, min_rank=0))
    allocation.ranks = dict.fromkeys(allocation.ranks, 0)
    with pytest.raises(ValueError, match="every module has rank 0: there is nothing to adapt"):
        build_lora_config(allocation)


# ---------------------------------------------------------------------------------------
# calibration data


def test_text_field_choice_names_the_fields(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("title,body\na,b\nc,d\n")
    with pytest.raises(
        ValueError,
        match=r"expected a 'text' or 'sentence' field or exactly one string field, found fields "
        r"\['title', 'body'\] \(2 of them strings\); pass text_field",
    ):
        calibration.load_texts(str(path))
    with pytest.raises(
        ValueError, match=r"expected a text field 'content', found fields \['title', 'body'\]"
    ):
        calibration.load_texts(str(path), text_field="content")
    assert calibration.load_texts(str(path), text_field="body") == ["b", "d"]


def test_malformed_local_files_name_the_line_or_byte(tmp_path):
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(
        ValueError, match=r"calib.jsonl:2: expected one JSON object per line, found"
    ):
        calibration.load_texts(str(jsonl))
    jsonl.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"calib.jsonl:2: expected one JSON object .*found list"):
        calibration.load_texts(str(jsonl))
    latin = tmp_path / "calib.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="expected UTF-8 text, found byte 0xe9 at offset 3"):
        calibration.load_texts(str(latin))
    other = tmp_path / "calib.docx"
    other.write_text("text")
    with pytest.raises(ValueError, match=r"expected a file ending in one of .*found '.docx'"):
        calibration.load_texts(str(other))


def test_a_folder_or_a_missing_file_as_calibration_source(tmp_path):
    (tmp_path / "texts.txt").mkdir()
    with pytest.raises(ValueError, match="expected a file, found a directory"):
        calibration.load_texts(str(tmp_path / "texts.txt"))
    with pytest.raises(FileNotFoundError, match="calibration file not found: .*missing.txt"):
        calibration.load_texts(str(tmp_path / "missing.txt"))


def test_a_tokenizer_without_pad_or_eos_cannot_pad():
    tokenizer = types.SimpleNamespace(pad_token_id=None, eos_token_id=[])
    with pytest.raises(ValueError, match="tokenizer has neither a pad token nor an eos token"):
        calibration._pad_token_id(tokenizer)
    assert (
        calibration._pad_token_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=[7])) == 7
    )


# ---------------------------------------------------------------------------------------
# distributed helpers


def test_distributed_argument_and_shard_errors():
    with pytest.raises(ValueError, match="distributed must be True, False or None, got 'yes'"):
        distributed_world("yes")
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        distributed_world(True)
    with pytest.raises(ValueError, match="rank must be an integer, got 1.0"):
        shard_batches([1, 2], 1.0, 2)
    with pytest.raises(ValueError, match="world_size must be an integer, got True"):
        shard_batches([1, 2], 0, True)
    with pytest.raises(ValueError, match="got rank=2 and world_size=2"):
        shard_batches([1, 2], 2, 2)
    assert shard_batches([0, 1, 2, 3, 4], 1, 2) == [1, 3]
