"""Task metrics: pure functions of predictions and references.

Every metric returns a plain float fraction (accuracy 0.85, not 85); the report layer
multiplies by 100. Conventions where a metric is undefined (documented, tested):

* ``matthews_corrcoef`` is 0.0 when predictions or labels are constant (zero denominator),
  as in scikit-learn;
* ``f1_binary`` is 0.0 when there is no positive among predictions and labels;
* ``pearson`` and ``spearman`` are 0.0 when either input is constant (zero variance), instead
  of NaN, so that a model that predicts one score for everything reports no correlation and
  means over seeds stay finite.

BLEU-4 is sacrebleu's corpus BLEU (tokenizer '13a', exponential smoothing); ROUGE-1 and
ROUGE-L are the mean F-measures of rouge_score with the Porter stemmer. Both packages are
imported when first used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from senslora.compare import spearman as rank_correlation

__all__ = [
    "CLASSIFICATION_METRICS",
    "accuracy",
    "bleu4",
    "classification_metrics",
    "f1_binary",
    "generation_metrics",
    "matthews_corrcoef",
    "pearson",
    "rouge",
    "spearman",
    "teacher_forced_loss",
]


def _pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays of the same, non-zero length."""
    pred, true = np.asarray(predictions), np.asarray(labels)
    if pred.ndim != 1 or true.ndim != 1:
        raise ValueError(
            f"expected 1-D predictions and labels, got shapes {pred.shape} and {true.shape}"
        )
    if len(pred) != len(true) or len(pred) == 0:
        raise ValueError(
            f"expected as many predictions as labels (at least one), got {len(pred)} "
            f"and {len(true)}"
        )
    return pred, true


def _finite_pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _pair(x, y)
    x, y = x.astype(np.float64), y.astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("expected finite values, found NaN or infinity")
    return x, y


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predictions equal to their label."""
    pred, true = _pair(predictions, labels)
    return float(np.mean(pred == true))


def f1_binary(predictions: Any, labels: Any, positive: int = 1) -> float:
    """F1 of the class ``positive``: 2TP / (2TP + FP + FN); 0.0 when that is 0 / 0."""
    pred, true = _pair(predictions, labels)
    true_positive = int(np.sum((pred == positive) & (true == positive)))
    false_positive = int(np.sum((pred == positive) & (true != positive)))
    false_negative = int(np.sum((pred != positive) & (true == positive)))
    denominator = 2 * true_positive + false_positive + false_negative
    return 0.0 if denominator == 0 else 2 * true_positive / denominator


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin, 2004).

    With the confusion matrix C (rows true, columns predicted), t = row sums, p = column
    sums, c = trace(C), s = sum(C):  MCC = (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)).
    For two classes this is the usual (TP TN - FP FN) / sqrt(...). 0.0 when undefined.
    """
    pred, true = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([true, pred]), return_inverse=True)
    true_codes, pred_codes = codes[: len(true)], codes[len(true) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_codes, pred_codes), 1.0)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - t @ p) / denominator)


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two sequences; 0.0 when either is constant."""
    x, y = _finite_pair(x, y)
    x_centered, y_centered = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x_centered**2) * np.sum(y_centered**2))
    if denominator == 0:
        return 0.0
    return float(np.clip(np.sum(x_centered * y_centered) / denominator, -1.0, 1.0))


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant, as
    the task metrics score a constant prediction."""
    x, y = _finite_pair(x, y)
    value = rank_correlation(x, y)
    return 0.0 if value is None else value


CLASSIFICATION_METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def classification_metrics(task: Any, predictions: Any, labels: Any) -> dict[str, float]:
    """``task.metrics`` of the predictions, plus 'combined' (mean of Pearson and Spearman)
    when the task has both.

    ``predictions`` are class indices (or scores for regression); a 2-D array of logits
    (N, num_labels) is reduced by argmax, or to its only column when num_labels is 1.
    """
    pred = np.asarray(predictions)
    if pred.ndim == 2:
        pred = pred[:, 0] if task.num_labels == 1 else pred.argmax(axis=1)
    unknown = [name for name in task.metrics if name not in CLASSIFICATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {list(CLASSIFICATION_METRICS)}")
    results = {name: CLASSIFICATION_METRICS[name](pred, labels) for name in task.metrics}
    if "pearson" in results and "spearman" in results:
        results["combined"] = (results["pearson"] + results["spearman"]) / 2
    return results


# ---------------------------------------------------------------------------------------
# Generation


def _texts(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"expected as many hypotheses as references (at least one), got {len(hypotheses)} "
            f"and {len(references)}"
        )
    if not all(isinstance(text, str) for text in hypotheses + references):
        raise ValueError("expected hypotheses and references to be strings")
    return hypotheses, references


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 of sacrebleu (one reference per hypothesis), as a fraction."""
    import sacrebleu

    hypotheses, references = _texts(hypotheses, references)
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize="13a").score / 100.0


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measures (rouge_score, Porter stemmer)."""
    from rouge_score import rouge_scorer

    hypotheses, references = _texts(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references, strict=True)]
    return {
        name: float(np.mean([score[name].fmeasure for score in scores]))
        for name in ("rouge1", "rougeL")
    }


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{'bleu4', 'rouge1', 'rougeL'} of generated texts against one reference each."""
    return {"bleu4": bleu4(hypotheses, references), **rouge(hypotheses, references)}


def teacher_forced_loss(model: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """{'loss', 'perplexity'}: the mean next-token cross-entropy (nats) over every labelled
    token of ``batches``, and its exponential.

    Each batch is a dict with ``input_ids``, ``labels`` (-100 where no loss is taken: prompt and
    padding) and optionally ``attention_mask``; token t's logits predict label t+1, as in a
    transformers causal LM. The mean is over *tokens*, not over batches (a batch with few response
    tokens weighs little), so the figure does not depend on how examples are batched. Unlike
    ROUGE or BLEU it needs no generation and no decoding choice, which makes it the low-noise
    metric of a generation task.
    """
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                labels = batch["labels"]
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, vocab)
                targets = labels[:, 1:].to(logits.device)  # (B, T-1)
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        targets.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("expected at least one labelled token (labels != -100), got none")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss)}
