"""Every curvature estimator against an exact reference on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, token_batches
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from transformers.pytorch_utils import Conv1D

from senslora import collect_statistics
from senslora.estimators.activation import collect_activation_statistics
from senslora.targets import find_target_modules


class EmbedLinear(nn.Module):
    """input_ids -> embedding -> linear: the linear layer's input X is known exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 6)
        self.proj = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(self.embed(input_ids))


def test_activation_equals_two_xtx_with_padding_masked():
    model = EmbedLinear()
    batches = token_batches(num_batches=3, batch=4, length=5)
    stats = collect_statistics(model, batches, keep_gram=True)["proj"]

    rows = [model.embed(b["input_ids"])[b["attention_mask"].bool()] for b in batches]
    X = torch.cat(rows).detach()  # (real tokens, d_in)
    expected_gram = 2 * X.T @ X
    assert stats.num_tokens == X.shape[0] < sum(b["input_ids"].numel() for b in batches)
    torch.testing.assert_close(stats.column_values, torch.diagonal(expected_gram))
    torch.testing.assert_close(stats.gram, expected_gram)
    diagonal = stats.hessian_diagonal()
    assert diagonal.shape == model.proj.weight.shape
    torch.testing.assert_close(diagonal, torch.diagonal(expected_gram).expand(4, -1))


def test_activation_on_tuple_batches_of_a_plain_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    xs = [torch.randn(8, 5) for _ in range(2)]
    stats = collect_statistics(model, [(x, None) for x in xs])
    hidden = torch.cat([torch.relu(model[0](x)) for x in xs]).detach()
    torch.testing.assert_close(stats["2"].column_values, 2 * hidden.square().sum(0))
    torch.testing.assert_close(stats["0"].column_values, 2 * torch.cat(xs).square().sum(0))


def test_conv1d_diagonal_is_shaped_like_its_transposed_weight():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(3, 5))  # nf=3 outputs, nx=5 inputs; weight (5, 3)
    x = torch.randn(2, 4, 5)
    stats = collect_statistics(model, [(x,)])["0"]
    assert (stats.shape.out_features, stats.shape.in_features) == (3, 5)
    diagonal = stats.hessian_diagonal()
    assert diagonal.shape == model[0].weight.shape == (5, 3)
    column = 2 * x.reshape(-1, 5).square().sum(0)
    torch.testing.assert_close(diagonal, column[:, None].expand(5, 3))


def test_padding_does_not_change_activation_statistics():
    model = tiny_bert()
    padded = token_batches(num_batches=2, batch=4, length=9)
    unpadded = [
        {k: v[i : i + 1, b["attention_mask"][i].bool()] for k, v in b.items()}
        for b in padded
        for i in range(4)
    ]
    a = collect_statistics(model, padded)
    b = collect_statistics(model, unpadded)
    for name in a:
        assert a[name].num_tokens == b[name].num_tokens
        torch.testing.assert_close(
            a[name].column_values, b[name].column_values, rtol=1e-4, atol=1e-4
        )


def test_early_stop_skips_the_head_and_changes_nothing():
    model = tiny_gpt2()
    batches = token_batches(num_batches=3)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    modules = find_target_modules(model)
    full = collect_activation_statistics(model, modules, batches, stop_early=False)
    n_full = len(calls)
    cut = collect_activation_statistics(model, modules, batches, stop_early=True)
    handle.remove()
    assert n_full == 3 and len(calls) == n_full + 1  # only the first batch reached the head
    for name in full:
        torch.testing.assert_close(full[name].column_values, cut[name].column_values)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mse(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def exact_hessian_diagonal(model, x, y):
    """Diagonal of the loss Hessian w.r.t. fc1.weight and fc2.weight, by torch.func.hessian."""
    params = dict(model.named_parameters())
    names = ["fc1.weight", "fc2.weight"]

    def loss(w1, w2):
        out = functional_call(model, {**params, names[0]: w1, names[1]: w2}, (x,))
        return (out - y).square().mean()

    h = hessian(loss, argnums=(0, 1))(params[names[0]], params[names[1]])
    d1 = torch.diagonal(h[0][0].reshape(12, 12)).reshape(4, 3)
    d2 = torch.diagonal(h[1][1].reshape(8, 8)).reshape(2, 4)
    return {"fc1": d1.detach(), "fc2": d2.detach()}


def test_hutchinson_matches_the_exact_hessian_diagonal():
    model = MLP()
    torch.manual_seed(2)
    batches = [(torch.randn(16, 3), torch.randn(16, 2)) for _ in range(2)]
    stats = collect_statistics(model, batches, estimator="hutchinson", loss_fn=mse, num_probes=4000)
    exact = [exact_hessian_diagonal(model, x, y) for x, y in batches]
    for name in ("fc1", "fc2"):
        reference = (exact[0][name] + exact[1][name]) / 2
        error = (stats[name].hessian_diagonal() - reference).abs().max()
        assert error <= 0.05 * reference.abs().max(), (name, error, reference)
    # away from a minimum the true diagonal has negative entries: the estimate keeps their sign
    reference = ((exact[0]["fc1"] + exact[1]["fc1"]) / 2).flatten()
    most_negative = reference.argmin()
    assert reference[most_negative] < 0
    assert stats["fc1"].hessian_diagonal().flatten()[most_negative] < 0


def test_hutchinson_is_reproducible_for_a_seed():
    model = MLP()
    batches = [(torch.randn(8, 3), torch.randn(8, 2))]
    a = collect_statistics(
        model, batches, estimator="hutchinson", loss_fn=mse, num_probes=3, seed=5
    )
    b = collect_statistics(
        model, batches, estimator="hutchinson", loss_fn=mse, num_probes=3, seed=5
    )
    assert all(torch.equal(a[n].diagonal, b[n].diagonal) for n in a)


def per_sample_gradients(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return (out - yi[None]).square().mean()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_fisher_equals_mean_of_per_sample_gradients_squared():
    model = MLP()
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    stats = collect_statistics(
        model, [(x[:4], y[:4]), (x[4:], y[4:])], estimator="fisher", loss_fn=mse
    )
    grads = per_sample_gradients(model, x, y)
    torch.testing.assert_close(stats["fc1"].diagonal, grads["fc1.weight"].square().mean(0))
    torch.testing.assert_close(stats["fc2"].diagonal, grads["fc2.weight"].square().mean(0))
    assert stats["fc1"].num_tokens == 6


def test_fisher_per_batch_squares_the_batch_gradient():
    model = MLP()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    stats = collect_statistics(model, [(x, y)], estimator="fisher", loss_fn=mse, per_sample=False)
    batch_grad = per_sample_gradients(model, x, y)["fc2.weight"].mean(0)
    torch.testing.assert_close(stats["fc2"].diagonal, batch_grad.square())


def test_gradient_estimators_restore_the_model_state():
    model = tiny_gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    collect_statistics(model, token_batches(num_batches=1), estimator="hutchinson", num_probes=1)
    assert model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


def test_default_loss_of_a_causal_lm_needs_no_labels():
    stats = collect_statistics(tiny_gpt2(), token_batches(num_batches=1), estimator="fisher")
    assert all(bool((s.diagonal > 0).any()) for s in stats.values())


def test_default_loss_without_labels_on_a_classifier_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'labels'"):
        collect_statistics(tiny_bert(), token_batches(num_batches=1), estimator="fisher")


def test_classifier_fisher_uses_labels():
    stats = collect_statistics(
        tiny_bert(), token_batches(num_batches=1, labels=True), estimator="fisher"
    )
    assert "classifier" not in stats and "bert.pooler.dense" not in stats
    assert len(stats) == 12


def test_unknown_estimator_and_empty_calibration_are_errors():
    with pytest.raises(ValueError, match="estimator must be one of"):
        collect_statistics(MLP(), [], estimator="newton")
    with pytest.raises(ValueError, match="calibration set is empty"):
        collect_statistics(MLP(), [])


def test_non_finite_activations_name_the_module():
    model = MLP()
    with pytest.raises(FloatingPointError, match="fc1"):
        collect_statistics(model, [(torch.tensor([[float("nan"), 0.0, 0.0]]),)])
