"""Allocation -> LoraConfig -> peft model: exact ranks; save/reload and merge keep the outputs."""

from __future__ import annotations

import json
import math
import re

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batches
from peft.tuners.lora import LoraLayer

import senslora
from senslora import AllocationConfig, allocate_ranks, apply_allocation, collect_statistics
from senslora.peft_bridge import (
    backbone_prefix,
    injected_ranks,
    pattern_key,
    suffix_key,
    verify_ranks,
)


def allocation_for(model, **config):
    stats = collect_statistics(model, token_batches(num_batches=2))
    return allocate_ranks(stats, AllocationConfig(**config))


def randomize_lora(model, seed=0):
    """lora_B starts at zero, which would make every output comparison trivially true."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(
    "make_model", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2-conv1d", "llama-decoder"]
)
def test_ranks_verified_and_save_reload_merge_round_trip(make_model, tmp_path):
    allocation = allocation_for(make_model(), avg_rank=4, min_rank=1)
    # ranks 1-5 by module position: with 4, 6 or 7 modules a layer, the same module of the
    # next layer gets another rank, so a pattern key that matched several modules would show
    allocation.ranks = {name: 1 + i % 5 for i, name in enumerate(allocation.ranks)}
    base = peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=make_model is tiny_gpt2)
    model = apply_allocation(make_model(), allocation, base)
    assert injected_ranks(model) == allocation.ranks
    randomize_lora(model)
    batch = token_batches(num_batches=1, seed=7)[0]
    expected = logits(model, batch)

    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(make_model(), tmp_path)
    verify_ranks(reloaded, allocation)
    torch.testing.assert_close(logits(reloaded, batch), expected)

    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-4, atol=1e-5)


def test_pattern_keys_are_escaped_backbone_relative_suffixes():
    assert pattern_key("bert.encoder.layer.1.output.dense") == (
        r"^bert\.encoder\.layer\.1\.output\.dense$"
    )
    model = tiny_bert()
    stats = collect_statistics(model, token_batches(num_batches=2))
    allocation = allocate_ranks(stats, AllocationConfig(), backbone=backbone_prefix(model))
    config = allocation.to_lora_config()
    relative = [name.removeprefix("bert.") for name in allocation.ranks]
    assert set(config.target_modules) == set(relative)  # peft stores a set
    assert list(config.rank_pattern) == [suffix_key(name) for name in relative]
    assert suffix_key("encoder.layer.1.output.dense") == r"encoder\.layer\.1\.output\.dense"
    # peft's rule: the key matches on a module boundary, and its dots are literal
    rule = r"(.*\.)?({})$"
    key = suffix_key("encoder.layer.1.output.dense")
    assert re.match(rule.format(key), "bert.encoder.layer.1.output.dense")
    assert not re.match(rule.format(key), "bert.encoder.layer.1.attention.output.dense")
    assert not re.match(rule.format(key), "bert.encoder.layer.1.output_dense")


@pytest.mark.parametrize("policy", ["scale", "rslora", "constant"])
def test_alpha_policies_survive_save_and_reload(policy, tmp_path):
    """Each module's scaling after a reload is the one its policy gives: alpha/r_w * r_w/r
    (scale), alpha/sqrt(r_w) (rslora), alpha/r_w (constant); the outputs are unchanged."""
    allocation = allocation_for(tiny_llama(), avg_rank=4)
    allocation.ranks = {name: 1 + i % 5 for i, name in enumerate(allocation.ranks)}
    base = peft.LoraConfig(r=4, lora_alpha=8)
    model = apply_allocation(tiny_llama(), allocation, base, alpha_policy=policy)
    randomize_lora(model)
    batch = token_batches(num_batches=1, seed=7)[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    verify_ranks(reloaded, allocation)
    scaling = {
        "scale": lambda r: 8 / 4,
        "rslora": lambda r: 8 / math.sqrt(r),
        "constant": lambda r: 8 / r,
    }[policy]
    found = 0
    for name, module in reloaded.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            rank = allocation.ranks[name]
            assert module.scaling["default"] == pytest.approx(scaling(rank)), (name, rank)
            found += 1
    assert found == len(allocation.ranks)
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_scale_policy_keeps_alpha_over_r_and_rslora_keeps_alpha():
    allocation = allocation_for(tiny_bert(), avg_rank=4)
    scaled = apply_allocation(tiny_bert(), allocation, peft.LoraConfig(r=4, lora_alpha=8))
    rs = apply_allocation(
        tiny_bert(), allocation, peft.LoraConfig(r=4, lora_alpha=8), alpha_policy="rslora"
    )
    for name, module in scaled.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            assert module.scaling["default"] == pytest.approx(2.0), name
    for name, module in rs.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            rank = allocation.ranks[name]
            assert module.scaling["default"] == pytest.approx(8 / math.sqrt(rank)), name


def test_rank_zero_modules_get_no_adapter():
    allocation = allocation_for(tiny_bert(), avg_rank=2, min_rank=0)
    zero = next(iter(allocation.ranks))
    allocation.ranks[zero] = 0
    allocation.ranks[list(allocation.ranks)[-1]] += 2
    config = allocation.to_lora_config()
    assert zero not in config.target_modules
    model = apply_allocation(tiny_bert(), allocation)
    assert zero not in injected_ranks(model)


def test_verify_ranks_catches_a_mismatch():
    allocation = allocation_for(tiny_bert())
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="LoRA ranks differ from the allocation"):
        verify_ranks(model, allocation)


def test_allocation_refuses_a_different_model():
    allocation = allocation_for(tiny_bert())
    with pytest.raises(ValueError, match="does not fit this model: it has no module 'bert"):
        apply_allocation(tiny_gpt2(), allocation)


def test_allocation_file_round_trip_and_corruption(tmp_path):
    allocation = allocation_for(tiny_bert())
    allocation.provenance["model"] = "tiny-bert"
    allocation.save(str(tmp_path))
    loaded = senslora.load_allocation(tmp_path)
    assert loaded.ranks == allocation.ranks
    assert loaded.shapes == allocation.shapes
    assert loaded.config == allocation.config
    for name, values in allocation.metrics.items():
        assert loaded.metrics[name] == pytest.approx(values)
    assert loaded.provenance["model"] == "tiny-bert"
    assert not list(tmp_path.glob("*.tmp"))

    path = tmp_path / "allocation.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        senslora.load_allocation(path)
    data = json.loads(text)
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema_version"):
        senslora.load_allocation(path)
    data = json.loads(text)
    data["ranks"][next(iter(data["ranks"]))] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="integer >= 0"):
        senslora.load_allocation(path)
    data = json.loads(text)
    data["modules"][next(iter(data["modules"]))]["shape"] = [3, 3]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fingerprint"):
        senslora.load_allocation(path)
