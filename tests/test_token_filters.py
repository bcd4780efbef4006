"""Leaving attention-sink tokens out of the activation statistics, against exact references."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches
from test_estimators import EmbedLinear

from senslora import collect_statistics
from senslora.estimators.token_filters import drop_outlier_rows, skip_leading_tokens
from senslora.targets import find_target_modules


def test_skip_leading_tokens_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    expected = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]).bool()
    assert torch.equal(skip_leading_tokens(mask, 1), expected)
    assert torch.equal(skip_leading_tokens(mask, 0), mask.bool())


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_skip_positions_equals_two_xtx_without_the_first_tokens(pad_side):
    model = EmbedLinear()
    batches = token_batches(num_batches=3, batch=4, length=6, pad_side=pad_side)
    stats = collect_statistics(model, batches, keep_gram=True, skip_positions=2)["proj"]

    rows = []  # the real tokens of each sequence but its first two, one by one
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            rows.append(model.embed(ids[mask.bool()][2:]))
    X = torch.cat(rows).detach()
    assert stats.num_tokens == X.shape[0]
    torch.testing.assert_close(stats.column_values, 2 * X.square().sum(0))
    torch.testing.assert_close(stats.gram, 2 * X.T @ X)


def test_outlier_factor_drops_the_tokens_above_the_median_norm():
    model = EmbedLinear()
    with torch.no_grad():
        model.embed.weight[1] *= 50.0  # token 1 is a "sink": a massive input
    batches = token_batches(num_batches=2, batch=4, length=6)
    for b in batches:
        b["input_ids"][:, 0] = 1  # the first token of every sequence
    stats = collect_statistics(model, batches, outlier_factor=5.0)["proj"]
    plain = collect_statistics(model, batches)["proj"]

    kept = []
    for b in batches:
        X = model.embed(b["input_ids"])[b["attention_mask"].bool()].detach()
        norms = X.norm(dim=1)
        median = norms.sort().values[(len(norms) - 1) // 2]  # lower median, as torch.median
        kept.append(X[norms <= 5.0 * median])
    X = torch.cat(kept)
    assert stats.num_tokens == X.shape[0] == plain.num_tokens - 8
    torch.testing.assert_close(stats.column_values, 2 * X.square().sum(0))
    assert plain.column_values.sum() > 100 * stats.column_values.sum()


def test_drop_outlier_rows_keeps_everything_without_a_scale():
    rows = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    assert torch.equal(drop_outlier_rows(rows, 2.0), rows)  # median norm 0
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [30.0, 40.0]])
    assert torch.equal(drop_outlier_rows(rows, 10.0), rows[:3])


def _llama_inputs(model, batches, skip):
    """2·Σ x² of every target module's inputs by hand: own hooks, no regrouping, no early stop."""
    modules = find_target_modules(model, "all-linear")
    seen = {name: [] for name in modules}
    masks = []

    def hook(name):
        return lambda _m, inputs, _o: seen[name].append(inputs[0].detach())

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
            masks.append(skip_leading_tokens(b["attention_mask"], skip))
    for h in handles:
        h.remove()
    return {
        name: 2 * torch.cat([x[m] for x, m in zip(xs, masks, strict=True)]).square().sum(0)
        for name, xs in seen.items()
    }


def test_skip_positions_on_a_tiny_llama_matches_hooks_by_hand():
    model = tiny_llama()
    batches = token_batches(num_batches=2, batch=3, length=8)
    stats = collect_statistics(model, batches, skip_positions=1)
    expected = _llama_inputs(model, batches, skip=1)
    assert list(stats) == list(expected)
    for name, values in expected.items():
        torch.testing.assert_close(stats[name].column_values, values, rtol=1e-5, atol=1e-6)


def test_filters_that_drop_nothing_leave_the_statistics_bit_identical():
    model = tiny_llama()
    batches = token_batches(num_batches=2, batch=3, length=8)
    default = collect_statistics(model, batches)
    filtered = collect_statistics(model, batches, skip_positions=0, outlier_factor=1e12)
    for name, s in default.items():
        assert torch.equal(filtered[name].column_values, s.column_values)
        assert filtered[name].num_tokens == s.num_tokens


def test_token_filter_arguments_are_checked():
    model = tiny_llama()
    batches = token_batches(num_batches=1)
    with pytest.raises(ValueError, match="skip_positions must be an int >= 0, got -1"):
        collect_statistics(model, batches, skip_positions=-1)
    with pytest.raises(ValueError, match="outlier_factor must be None or a number > 1"):
        collect_statistics(model, batches, outlier_factor=1.0)
    with pytest.raises(ValueError, match="activation estimator"):
        collect_statistics(model, batches, estimator="fisher", skip_positions=1)
