"""Which modules are adaptable and how targets select them."""

from __future__ import annotations

import pytest
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from senslora.targets import find_target_modules, layer_shape


def test_all_linear_excludes_heads():
    names = list(find_target_modules(tiny_bert()))
    assert len(names) == 12
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in names)
    llama = list(find_target_modules(tiny_llama()))
    assert "lm_head" not in llama and len(llama) == 14
    assert "lm_head" in find_target_modules(tiny_llama(), include_heads=True)


def test_names_match_peft_style_suffixes_and_regex_fullmatch():
    model = tiny_bert()
    by_name = find_target_modules(model, ["query", "value"])
    assert sorted(by_name) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")
    )
    by_regex = find_target_modules(model, r".*layer\.1\..*dense")
    assert sorted(by_regex) == [
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense",
    ]


def test_conv1d_geometry():
    modules = find_target_modules(tiny_gpt2())
    shape = layer_shape(modules["transformer.h.0.attn.c_attn"])
    assert (shape.out_features, shape.in_features, shape.transposed) == (48, 16, True)
    assert shape.weight_shape == (16, 48)


def test_nothing_matched_and_no_adaptable_layers_are_errors():
    with pytest.raises(
        ValueError, match="matched no adaptable module; adaptable modules look like"
    ):
        find_target_modules(tiny_bert(), ["q_proj"])
    with pytest.raises(ValueError, match="has no adaptable layers"):
        find_target_modules(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="targets must be"):
        find_target_modules(tiny_bert(), [1, 2])
