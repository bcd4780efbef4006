"""The frozen-encoder baseline: what the *untuned* model's pooled embeddings already give.

A linear probe (multinomial logistic regression, or ridge regression for a regression task) is
fitted on the training set's embeddings and scored on dev with the task's own metrics. A
fine-tuning method that does not beat it has not trained.

Pair tasks are embedded one of two ways (``pair_input``):

- ``"joint"``: the pair as the model's pair input ([CLS] a [SEP] b [SEP]), pooled: the input a
  fine-tuned classifier sees, so the probe measures where fine-tuning starts from;
- ``"siamese"``: each sentence alone, pooled and L2-normalised to u and v, features
  [u, v, |u - v|, u * v] (InferSent / SentEval). This is how a sentence-transformers model was
  trained to compare sentences; the sum of u * v is their cosine, so a linear probe on these
  features contains every cosine-threshold classifier (and, for regression, every affine map of
  the cosine).

The L2 strength is chosen by k-fold cross-validation on the training set (task's main metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from senslora.finetune.evaluation import classification_metrics
from senslora.finetune.heads import load_classifier

PAIR_INPUTS = ("joint", "siamese")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Candidate L2 strengths (per example, on z-scored features)."""


@torch.no_grad()
def embed_texts(model, tokenizer, texts_a, texts_b=None, *, max_length=128, batch_size=64):
    """(N, d) pooled embeddings of texts (or text pairs as one input), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(texts_a), batch_size):
        chunk_a = list(texts_a[start : start + batch_size])
        pair = [] if texts_b is None else [list(texts_b[start : start + batch_size])]
        batch = tokenizer(
            chunk_a,
            *pair,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        rows.append(model.pooled(**{k: v.to(device) for k, v in batch.items()}).double().cpu())
    return torch.cat(rows)


def probe_features(model, tokenizer, examples: Sequence, pair_input: str, **kwargs):
    """Probe features of task examples (see the module docstring)."""
    if pair_input not in PAIR_INPUTS:
        raise ValueError(f"pair_input must be one of {PAIR_INPUTS}, got {pair_input!r}")
    texts_a = [e.text_a for e in examples]
    if all(e.text_b is None for e in examples):
        return embed_texts(model, tokenizer, texts_a, **kwargs)
    texts_b = [e.text_b or "" for e in examples]
    if pair_input == "joint":
        return embed_texts(model, tokenizer, texts_a, texts_b, **kwargs)
    u = torch.nn.functional.normalize(embed_texts(model, tokenizer, texts_a, **kwargs), dim=1)
    v = torch.nn.functional.normalize(embed_texts(model, tokenizer, texts_b, **kwargs), dim=1)
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def fit_logistic(features, labels, num_classes: int, l2: float, max_iter: int = 200):
    """Multinomial logistic regression, mean cross-entropy + l2/2 |W|^2 (bias free), by L-BFGS
    in float64. Returns (W (F, C), b (C,))."""
    x = features.double()
    y = torch.as_tensor(labels, dtype=torch.long)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_ridge(features, targets, l2: float):
    """Ridge regression, mean squared error + l2 |w|^2 (bias free): the closed form
    w = (Xc'Xc / N + l2 I)^-1 Xc'yc / N on centred data. Returns (w (F, 1), b (1,))."""
    x = features.double()
    y = torch.as_tensor(targets, dtype=torch.float64)
    x_mean, y_mean = x.mean(dim=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    n = x.shape[0]
    gram = xc.T @ xc / n + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc / n).unsqueeze(1)
    bias = (y_mean - x_mean @ weight).reshape(1)
    return weight, bias


def _fit(task, features, labels, l2):
    if task.num_labels == 1:
        return fit_ridge(features, labels, l2)
    return fit_logistic(features, labels, task.num_labels, l2)


def _score(task, features, labels, weight, bias) -> dict[str, float]:
    logits = (features.double() @ weight + bias).numpy()
    return classification_metrics(task, logits, list(labels))


def choose_l2(task, features, labels, grid=L2_GRID, folds: int = 3) -> float:
    """The L2 strength of ``grid`` with the best mean main metric over ``folds`` contiguous
    folds of a fixed permutation (ties: the stronger regularisation)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    chunks = torch.tensor_split(order, folds)
    labels = list(labels)
    best, best_score = None, -math.inf
    for l2 in sorted(grid, reverse=True):
        scores = []
        for k, held in enumerate(chunks):
            kept = torch.cat([c for j, c in enumerate(chunks) if j != k])
            weight, bias = _fit(task, features[kept], [labels[i] for i in kept], l2)
            held_labels = [labels[i] for i in held]
            scores.append(_score(task, features[held], held_labels, weight, bias)[task.main_metric])
        if sum(scores) / folds > best_score:
            best, best_score = l2, sum(scores) / folds
    return best


def frozen_probe(
    task,
    model_path: str,
    *,
    pooling: str = "auto",
    pair_input: str = "joint",
    max_length: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
    l2: float | None = None,
) -> dict:
    """Fit a linear probe on the untuned model's pooled embeddings of ``task.train`` and score
    it on every dev split. ``l2=None`` picks it by cross-validation (:func:`choose_l2`).

    Returns {"pooling", "pair_input", "l2", "num_train", "dev": {split: metrics}}."""
    model = load_classifier(model_path, max(task.num_labels, 2), pooling=pooling, device=device)
    from senslora.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    options = {"max_length": max_length, "batch_size": batch_size}
    train_x = probe_features(model, tokenizer, task.train, pair_input, **options)
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp(min=1e-8)
    train_x = (train_x - mean) / std  # z-scored: one L2 grid fits every model's scale
    labels = [e.label for e in task.train]
    chosen = choose_l2(task, train_x, labels) if l2 is None else l2
    weight, bias = _fit(task, train_x, labels, chosen)
    dev = {}
    for split, examples in task.dev.items():
        dev_x = (probe_features(model, tokenizer, examples, pair_input, **options) - mean) / std
        dev[split] = _score(task, dev_x, [e.label for e in examples], weight, bias)
    return {
        "pooling": model.pooling,
        "pair_input": pair_input,
        "l2": chosen,
        "num_train": len(task.train),
        "dev": dev,
    }
