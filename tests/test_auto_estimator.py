"""estimator="auto", the default of the entry points: the Fisher with the next-token loss for a
causal LM, the activation statistics otherwise (encoders; offloaded or quantized weights; token
filters and the Gram matrix, which only the activation statistics give)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import missing_asset, tiny_bert, tiny_gpt2, tiny_llama, token_batches
from torch import nn

from senslora import collect_statistics
from senslora.estimators import (
    DEFAULT_ESTIMATOR,
    available_memory_bytes,
    fisher_memory_bytes,
    resolve_estimator,
)
from senslora.pipeline import calibrate
from senslora.targets import find_target_modules


def test_auto_is_the_fisher_for_a_causal_lm_and_the_activation_otherwise():
    assert DEFAULT_ESTIMATOR == "auto"
    assert resolve_estimator("auto", tiny_llama()) == "fisher"
    assert resolve_estimator("auto", tiny_gpt2()) == "fisher"  # *LMHeadModel
    assert resolve_estimator("auto", tiny_bert()) == "activation"
    assert resolve_estimator("auto", tiny_llama(), keep_gram=True) == "activation"
    assert resolve_estimator("auto", tiny_llama(), outlier_factor=10.0) == "activation"
    for name in ("activation", "fisher", "hutchinson"):
        assert resolve_estimator(name, tiny_bert()) == name  # an explicit choice stands
    with pytest.raises(ValueError, match="estimator must be one of .* got 'magic'"):
        resolve_estimator("magic", tiny_bert())


def test_fisher_memory_counts_a_gradient_and_a_float32_accumulator_per_adapted_weight():
    model = tiny_llama()
    modules = find_target_modules(model, "all-linear")
    weights = sum(m.weight.numel() for m in modules.values())
    assert fisher_memory_bytes(modules) == {torch.device("cpu"): weights * (4 + 4)}
    model.to(torch.bfloat16)
    assert fisher_memory_bytes(modules) == {torch.device("cpu"): weights * (4 + 2)}


def test_available_memory_of_the_cpu_is_read():
    free = available_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert available_memory_bytes(torch.device("meta")) is None


def test_auto_falls_back_to_the_activation_when_the_fisher_would_not_fit(monkeypatch):
    import senslora.estimators as estimators

    model = tiny_llama()
    modules = find_target_modules(model, "all-linear")
    needed = fisher_memory_bytes(modules)[torch.device("cpu")]
    monkeypatch.setattr(estimators, "available_memory_bytes", lambda device: needed)
    assert resolve_estimator("auto", model, modules) == "fisher"  # it just fits
    monkeypatch.setattr(estimators, "available_memory_bytes", lambda device: needed - 1)
    with pytest.warns(UserWarning, match=r"Fisher needs about .* GiB on cpu .* activation"):
        assert resolve_estimator("auto", model, modules) == "activation"
    assert resolve_estimator("fisher", model, modules) == "fisher"  # an explicit choice stands
    monkeypatch.setattr(estimators, "available_memory_bytes", lambda device: None)
    assert resolve_estimator("auto", model, modules) == "fisher"  # unknown: no guess
    # the statistics follow the same rule
    monkeypatch.setattr(estimators, "available_memory_bytes", lambda device: 0)
    with pytest.warns(UserWarning, match="activation statistics instead"):
        stats = collect_statistics(model, token_batches(), estimator="auto")
    assert {s.estimator for s in stats.values()} == {"activation"}


def test_auto_falls_back_to_the_activation_where_no_gradient_can_be_read():
    model = tiny_llama()
    modules = find_target_modules(model, "all-linear")
    assert resolve_estimator("auto", model, modules) == "fisher"
    layer = next(iter(modules.values()))
    layer.weight = nn.Parameter(layer.weight.data.to(torch.int8), requires_grad=False)  # quantized
    assert resolve_estimator("auto", model, modules) == "activation"


def test_auto_statistics_equal_the_explicit_estimator_s():
    batches = token_batches(num_batches=2)
    for model, expected in ((tiny_llama(), "fisher"), (tiny_bert(), "activation")):
        auto = collect_statistics(model, batches, estimator="auto")
        explicit = collect_statistics(model, batches, estimator=expected)
        assert {s.estimator for s in auto.values()} == {expected}
        for name, stats in explicit.items():
            for field in ("diagonal", "column_values"):
                a, b = getattr(auto[name], field), getattr(stats, field)
                assert (a is None and b is None) or torch.equal(a, b)


def test_auto_with_token_filters_keeps_the_activation_statistics():
    stats = collect_statistics(tiny_llama(), token_batches(), estimator="auto", outlier_factor=10.0)
    assert {s.estimator for s in stats.values()} == {"activation"}


def test_calibrate_defaults_to_auto_and_records_what_it_resolved_to():
    calibrated = calibrate(tiny_llama(), token_batches())
    assert calibrated.provenance["estimator"] == "fisher"
    assert calibrated.provenance["estimator_requested"] == "auto"
    encoder = calibrate(tiny_bert(), token_batches())
    assert encoder.provenance["estimator"] == "activation"


def test_allocate_on_a_causal_lm_folder_uses_the_fisher(tmp_path):
    allocate_on_a_causal_lm_folder(tmp_path)


def allocate_on_a_causal_lm_folder(tmp_path):
    """Runs `senslora allocate` on a tiny Llama folder; returns the folder and the arguments."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from senslora.cli import app
    from senslora.data.assets import minilm_path
    from senslora.serialization import load_allocation

    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    except (FileNotFoundError, OSError):
        missing_asset("the MiniLM package is not installed (make setup)")
    folder = tmp_path / "llama"
    model = tiny_llama()
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = ["allocate", "--model", str(folder), "--num-samples", "4", "--seq-len", "16"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "calibrating (fisher)" in result.output
    provenance = load_allocation(tmp_path / "out").provenance
    assert (provenance["estimator"], provenance["estimator_requested"]) == ("fisher", "auto")
    saved = json.loads((tmp_path / "out" / "allocation.json").read_text())
    assert saved["config"]["budget"] == "parameters"
    return folder, args


def test_allocate_warns_once_when_auto_falls_back(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import senslora.estimators as estimators
    from senslora.cli import app

    folder, args = allocate_on_a_causal_lm_folder(tmp_path)
    monkeypatch.setattr(estimators, "available_memory_bytes", lambda device: 0)
    with pytest.warns(UserWarning, match="the next-token Fisher needs about") as caught:
        out = ["--device", "cpu", "--out", str(tmp_path / "fallback")]
        result = CliRunner().invoke(app, [*args, *out])
    assert result.exit_code == 0, result.output
    assert "calibrating (activation)" in result.output
    assert sum("next-token Fisher needs" in str(w.message) for w in caught) == 1
