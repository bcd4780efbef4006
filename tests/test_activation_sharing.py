"""The activation estimator's fast path against a naive reference: real tokens gathered once per
batch, and one computation per distinct input for modules that read the same tensor."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_batches
from torch import nn

from senslora import collect_statistics
from senslora.estimators import activation
from senslora.targets import find_target_modules


def naive_statistics(model, batches):
    """2·Σ x_tj² and 2·XᵀX over the real tokens of every target module, by boolean indexing."""
    modules = find_target_modules(model)
    sums = {name: 0 for name in modules}
    grams = {name: 0 for name in modules}
    mask = {}

    def make_hook(name):
        def hook(_module, inputs, _output):
            x = inputs[0][mask["current"]].float()  # (B, T, d_in) -> (real tokens, d_in)
            sums[name] = sums[name] + 2 * x.square().sum(0)
            grams[name] = grams[name] + 2 * x.T @ x

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            mask["current"] = batch["attention_mask"].bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    return sums, grams


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama])
def test_fast_path_matches_boolean_indexing(make_model):
    model = make_model()
    batches = token_batches(num_batches=3, batch=4, length=9)
    stats = collect_statistics(model, batches, keep_gram=True)
    sums, grams = naive_statistics(model, batches)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name, s in stats.items():
        assert s.num_tokens == real_tokens
        torch.testing.assert_close(s.column_values, sums[name])
        torch.testing.assert_close(s.gram, grams[name])


def test_modules_reading_one_input_share_one_computation(monkeypatch):
    model = tiny_llama()  # per layer: q, k, v read one input, gate and up another
    copies = []
    original = activation.RealTokens.copy_rows

    def counting(self, x):
        copies.append(x.shape)
        return original(self, x)

    monkeypatch.setattr(activation.RealTokens, "copy_rows", counting)
    batches = token_batches(num_batches=2, batch=3, length=7)
    stats = collect_statistics(model, batches)
    layers = model.config.num_hidden_layers
    assert len(stats) == 7 * layers
    assert len(copies) == 4 * layers * len(batches)  # q/k/v, o, gate/up, down
    prefix = "model.layers.0."
    for group in (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ):
        first = stats[prefix + group[0]].column_values
        for other in group[1:]:
            assert torch.equal(stats[prefix + other].column_values, first)
            assert stats[prefix + other].column_values is not first  # own tensor


@pytest.mark.parametrize("flush_bytes", [0, 10_000, 2**30])
def test_any_flush_size_gives_the_reference_statistics(flush_bytes, monkeypatch):
    """Reducing the inputs one by one, a few at a time or a whole forward pass at once."""
    model = tiny_llama()
    batches = token_batches(num_batches=3, batch=4, length=9)
    flushed = []
    original = activation.GroupedSums.flush

    def recording(self, pending):
        flushed.append(len(pending))
        return original(self, pending)

    monkeypatch.setattr(activation.GroupedSums, "flush", recording)
    modules = find_target_modules(model)
    stats = activation.collect_activation_statistics(
        model, modules, batches, keep_gram=True, flush_bytes=flush_bytes, regroup=False
    )
    sums, grams = naive_statistics(model, batches)
    for name, s in stats.items():
        torch.testing.assert_close(s.column_values, sums[name])
        torch.testing.assert_close(s.gram, grams[name])
    distinct = 4 * model.config.num_hidden_layers * len(batches)
    assert sum(flushed) == distinct
    if flush_bytes == 0:
        assert set(flushed) == {1}  # one input at a time
    elif flush_bytes == 2**30:
        assert len(flushed) == len(batches)  # one reduction per forward pass
    else:
        assert len(batches) < len(flushed) < distinct


class _InPlaceAfterUse(nn.Module):
    """Reads x with one layer, then overwrites x in place: the statistics must see x as the layer
    saw it (the hooks copy, the reduction comes later). Then one layer reads a new tensor and
    another layer reads that tensor twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.second = nn.Linear(5, 3)
        self.third = nn.Linear(5, 3)

    def forward(self, x):
        y = self.first(x)
        x.mul_(3.0)
        z = x + 0.0
        return self.second(z) + self.third(z) + self.third(z) + y[..., :3]


def test_inputs_modified_in_place_after_the_hook_are_counted_as_read():
    torch.manual_seed(0)
    model = _InPlaceAfterUse()
    x = torch.randn(2, 4, 5)
    modules = {"first": model.first, "second": model.second, "third": model.third}
    stats = activation.collect_activation_statistics(model, modules, [(x.clone(),)])
    scaled = 3.0 * x
    expected = {
        "first": 2 * x.square().sum((0, 1)),
        "second": 2 * scaled.square().sum((0, 1)),
        "third": 4 * scaled.square().sum((0, 1)),  # called twice on the same tensor
    }
    for name, values in expected.items():
        torch.testing.assert_close(stats[name].column_values, values)
    assert [stats[n].num_tokens for n in ("first", "second", "third")] == [8, 8, 16]


def test_negative_flush_size_is_refused():
    model = tiny_bert()
    with pytest.raises(ValueError, match="flush_bytes must be >= 0, got -1"):
        activation.collect_activation_statistics(
            model, find_target_modules(model), [], flush_bytes=-1
        )


def test_unpadded_batches_take_the_rows_as_they_are():
    model = tiny_bert()
    batches = token_batches(num_batches=2, batch=3, length=6)
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    stats = collect_statistics(model, batches)
    sums, _ = naive_statistics(model, batches)
    for name, s in stats.items():
        assert s.num_tokens == 2 * 3 * 6
        torch.testing.assert_close(s.column_values, sums[name])


def _inputs_under_autocast(model, modules, batches):
    """Every target module's inputs, as the model feeds them under bfloat16 autocast (some
    float32, after a norm, some bfloat16), with their padding rows dropped."""
    seen = {name: [] for name in modules}
    mask = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, inputs, name=name: seen[name].append(inputs[0][mask["now"]].clone())
        )
        for name, m in modules.items()
    ]
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for batch in batches:
                mask["now"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_autocast_accumulates_in_float32():
    """Under bfloat16 autocast the sums 2·Σ x_j² match a float64 sum of the very inputs the
    model computed (bfloat16 ones included) to float32 precision. Summing (or squaring) in
    bfloat16 keeps ~3 significant digits: with 2 x 256 tokens per batch its error is around
    1e-3 relative, far above the 1e-5 allowed here."""
    model = tiny_llama()
    batches = token_batches(num_batches=4, batch=8, length=64, seed=3)
    modules = find_target_modules(model)
    low = activation.collect_activation_statistics(
        model, modules, batches, autocast_dtype=torch.bfloat16, regroup=False, stop_early=False
    )
    seen = _inputs_under_autocast(model, modules, batches)
    dtypes = {x.dtype for inputs in seen.values() for x in inputs}
    assert dtypes == {torch.float32, torch.bfloat16}  # both kinds of input are exercised
    for name, s in low.items():
        assert s.column_values.dtype == torch.float32
        reference = sum(2 * x.double().square().sum(0) for x in seen[name])
        assert s.num_tokens == sum(x.shape[0] for x in seen[name])
        torch.testing.assert_close(s.column_values.double(), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama])
def test_grouped_reduction_under_autocast_matches_the_per_input_one(make_model):
    """Under bf16 autocast some layer inputs are float32 (after a layer norm), others bfloat16:
    grouped together by width, they give what reducing each on its own gives."""
    model = make_model()
    batches = token_batches(num_batches=3, batch=4, length=9)
    modules = find_target_modules(model)
    kwargs = {"autocast_dtype": torch.bfloat16, "keep_gram": True}
    grouped = activation.collect_activation_statistics(
        model, modules, batches, flush_bytes=2**30, **kwargs
    )
    alone = activation.collect_activation_statistics(
        model, modules, batches, flush_bytes=0, **kwargs
    )
    for name in modules:
        assert grouped[name].num_tokens == alone[name].num_tokens
        torch.testing.assert_close(grouped[name].column_values, alone[name].column_values)
        torch.testing.assert_close(grouped[name].gram, alone[name].gram)


def test_model_activations_are_not_modified():
    """Squaring happens in place only on copies: the model's outputs do not change."""
    model = tiny_bert()
    batch = token_batches(num_batches=1, batch=2, length=5)[0]
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # rows are views
    with torch.no_grad():
        before = model(**batch).logits
    modules = find_target_modules(model)
    activation.collect_activation_statistics(model, modules, [batch], stop_early=False)
    outputs = []
    handle = model.classifier.register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
    try:
        activation.collect_activation_statistics(model, modules, [batch], stop_early=False)
    finally:
        handle.remove()
    torch.testing.assert_close(outputs[0], before)


@pytest.mark.parametrize("side", ["right", "left"])
def test_regrouping_keeps_every_real_token_and_the_padding_side(side):
    batches = token_batches(num_batches=3, batch=4, length=9, pad_side=side)
    regrouped = list(activation.regroup_by_length(batches))
    assert [b["input_ids"].shape[0] for b in regrouped] == [4, 4, 4]
    padded = sum(b["input_ids"].numel() for b in regrouped)
    assert padded < sum(b["input_ids"].numel() for b in batches)

    def real_rows(batch_list):
        rows = []
        for b in batch_list:
            for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
                rows.append(tuple(ids[mask.bool()].tolist()))
        return sorted(rows)

    assert real_rows(regrouped) == real_rows(batches)
    lengths = [int(m.sum()) for b in regrouped for m in b["attention_mask"]]
    assert lengths == sorted(lengths)  # shortest first
    for b in regrouped:
        edge = b["attention_mask"][:, 0 if side == "right" else -1]
        assert bool(edge.all())  # every row starts (right) or ends (left) with a real token


def test_regrouping_passes_other_batches_through_in_order():
    plain = token_batches(num_batches=2, batch=3, length=5)
    labelled = token_batches(num_batches=1, batch=3, length=5, labels=True)[0]
    tuples = (torch.zeros(2, 3),)
    holes = {
        "input_ids": torch.ones(1, 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 0, 1]]),
    }
    out = list(activation.regroup_by_length([plain[0], labelled, tuples, holes, plain[1]]))
    assert out[1] is labelled and out[2] is tuples and out[3] is holes
    assert len(out) == 5


def test_regrouped_statistics_equal_the_original_ones():
    model = tiny_bert()
    batches = token_batches(num_batches=4, batch=4, length=11)
    modules = find_target_modules(model)
    grouped = activation.collect_activation_statistics(model, modules, batches)
    original = activation.collect_activation_statistics(model, modules, batches, regroup=False)
    for name in modules:
        assert grouped[name].num_tokens == original[name].num_tokens
        torch.testing.assert_close(
            grouped[name].column_values, original[name].column_values, rtol=1e-4, atol=1e-5
        )
