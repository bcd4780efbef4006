"""The fisher estimator on a sequence classifier's own labelled examples (its own ``.loss``)."""

from __future__ import annotations

import torch
from conftest import tiny_bert, token_batches

from senslora import AllocationConfig, allocate_ranks, collect_statistics

MODULE = "bert.encoder.layer.1.intermediate.dense"


def per_sample_reference(model, batches) -> torch.Tensor:
    """Mean over samples of the squared gradient of the model's cross-entropy, by hand."""
    weight = dict(model.named_modules())[MODULE].weight
    total, count = torch.zeros_like(weight), 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            logits = model(
                input_ids=batch["input_ids"][i : i + 1, :length],
                attention_mask=batch["attention_mask"][i : i + 1, :length],
            ).logits
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"][i : i + 1])
            (grad,) = torch.autograd.grad(loss, weight)
            total += grad.square()
            count += 1
    return total / count


def test_fisher_on_labelled_batches_is_the_per_sample_cross_entropy_fisher():
    model = tiny_bert()
    batches = token_batches(num_batches=2, labels=True)
    stats = collect_statistics(model, batches, estimator="fisher")
    torch.testing.assert_close(
        stats[MODULE].diagonal, per_sample_reference(model, batches), rtol=1e-4, atol=0
    )
    assert stats[MODULE].num_tokens == 6  # samples averaged over


def test_fisher_statistics_follow_the_labels_and_allocate():
    model = tiny_bert()
    batches = token_batches(num_batches=2, labels=True)
    flipped = [{**b, "labels": 1 - b["labels"]} for b in batches]
    stats = collect_statistics(model, batches, estimator="fisher")
    other = collect_statistics(model, flipped, estimator="fisher")
    change = (stats[MODULE].diagonal - other[MODULE].diagonal).abs() / stats[MODULE].diagonal
    assert float(change.max()) > 1e-3  # the squared gradients see (p - y): the labels count
    allocation = allocate_ranks(stats, AllocationConfig(avg_rank=3, budget="parameters"))
    assert allocation.num_parameters <= allocation.uniform_parameters()
    assert len(set(allocation.ranks.values())) > 1
