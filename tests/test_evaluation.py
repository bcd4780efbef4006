"""Task metrics against values computed by hand (no scipy or scikit-learn)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from senslora.finetune.evaluation import (
    accuracy,
    bleu4,
    classification_metrics,
    f1_binary,
    generation_metrics,
    matthews_corrcoef,
    pearson,
    rouge,
    spearman,
    teacher_forced_loss,
)
from senslora.finetune.tasks import ClassificationTask, Example

PREDICTIONS = [1, 1, 0, 0, 1]
LABELS = [1, 0, 0, 1, 1]  # TP 2, TN 1, FP 1, FN 1


def _task(metrics, main_metric, num_labels=2):
    example = Example("a", None, 0)
    return ClassificationTask(
        "t", (example,), {"dev": (example,)}, num_labels, metrics, main_metric, None
    )


def test_accuracy():
    assert accuracy(PREDICTIONS, LABELS) == pytest.approx(3 / 5)
    assert accuracy(np.array([2, 0]), np.array([2, 0])) == 1.0


def test_f1_binary():
    assert f1_binary(PREDICTIONS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # class 0 as positive: TP 1 (index 2), FP 1 (index 3), FN 1 (index 1)
    assert f1_binary(PREDICTIONS, LABELS, positive=0) == pytest.approx(2 / 4)
    assert f1_binary([0, 0], [0, 0]) == 0.0  # no positive anywhere: 0 / 0 -> 0.0


def test_matthews_binary_by_hand():
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3 * 3 * 2 * 2)
    assert matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(1 / 6)
    assert matthews_corrcoef(LABELS, LABELS) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - x for x in LABELS], LABELS) == pytest.approx(-1.0)


def test_matthews_multiclass_by_hand():
    # C = [[2,0,0],[0,1,1],[0,1,1]]: c=4, s=6, t=p=(2,2,2): (24 - 12) / sqrt(24 * 24) = 0.5
    assert matthews_corrcoef([0, 2, 1, 0, 1, 2], [0, 1, 2, 0, 1, 2]) == pytest.approx(0.5)


def test_matthews_is_zero_when_undefined():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_pearson_by_hand():
    # centred x = (-1, 0, 1), y = (-5/3, -2/3, 7/3): 4 / sqrt(2 * 78/9) = 12 / sqrt(156)
    assert pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(12 / math.sqrt(156))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_averages_tied_ranks():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)


def test_correlations_of_a_constant_are_zero():
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="as many predictions as labels"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="as many predictions as labels"):
        accuracy([], [])
    with pytest.raises(ValueError, match="finite"):
        pearson([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        matthews_corrcoef([[1, 0]], [[1, 0]])


def test_classification_metrics_of_a_task():
    mrpc_like = _task(("accuracy", "f1"), "accuracy")
    assert classification_metrics(mrpc_like, PREDICTIONS, LABELS) == pytest.approx(
        {"accuracy": 3 / 5, "f1": 2 / 3}
    )
    logits = np.eye(2)[PREDICTIONS] * 3.0 - 1.0  # (N, 2); argmax gives PREDICTIONS
    assert classification_metrics(mrpc_like, logits, LABELS)["accuracy"] == pytest.approx(0.6)


def test_classification_metrics_stsb_combined():
    stsb_like = _task(("pearson", "spearman"), "combined", num_labels=1)
    scores = classification_metrics(stsb_like, np.array([[1.0], [2.0], [2.0], [3.0]]), [1, 3, 2, 4])
    assert set(scores) == {"pearson", "spearman", "combined"}
    assert scores["combined"] == pytest.approx((scores["pearson"] + scores["spearman"]) / 2)
    assert scores["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))


def test_bleu4():
    text = "the quick brown fox jumps over the lazy dog"
    assert bleu4([text, text], [text, text]) == pytest.approx(1.0)
    assert bleu4(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    # precisions 5/6, 3/5, 2/4, 1/3; equal lengths (no brevity penalty): (1/12) ** (1/4)
    assert bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        (1 / 12) ** 0.25
    )


def test_rouge():
    assert rouge(["the cat sat"], ["the cat sat"]) == pytest.approx({"rouge1": 1.0, "rougeL": 1.0})
    # overlap {the, cat}: P 2/3, R 2/4 -> F 4/7; the LCS "the cat" gives the same
    assert rouge(["the cat sat"], ["the cat ran away"]) == pytest.approx(
        {"rouge1": 4 / 7, "rougeL": 4 / 7}
    )
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)  # stemmer
    assert rouge(["b a", "x"], ["a b", "y"])["rougeL"] == pytest.approx((0.5 + 0.0) / 2)


def test_generation_metrics():
    scores = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert scores == pytest.approx({"bleu4": 1.0, "rouge1": 1.0, "rougeL": 1.0})
    with pytest.raises(ValueError, match="as many hypotheses"):
        generation_metrics(["a"], [])


class _TableLM(torch.nn.Module):
    """Logits of position t are row input_ids[t] of a fixed table: a causal LM by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _nll(row, target):
    """-log softmax(row)[target], by hand."""
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def test_teacher_forced_loss_by_hand():
    table = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]]
    model = _TableLM(table).train()
    batches = [
        # one sequence, labels on its last two tokens: positions 1 and 2 predict 1 and 2
        {"input_ids": torch.tensor([[0, 1, 2]]), "labels": torch.tensor([[-100, 1, 2]])},
        # two sequences, one labelled token each (the second padded with -100)
        {
            "input_ids": torch.tensor([[2, 0], [1, 1]]),
            "attention_mask": torch.tensor([[1, 1], [1, 1]]),
            "labels": torch.tensor([[-100, 0], [-100, -100]]),
        },
    ]
    nlls = [_nll(table[0], 1), _nll(table[1], 2), _nll(table[2], 0)]
    result = teacher_forced_loss(model, batches)
    assert result["loss"] == pytest.approx(sum(nlls) / 3, rel=1e-6)  # per token, not per batch
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / 3), rel=1e-6)
    assert model.training  # mode restored


def test_teacher_forced_loss_without_labelled_tokens():
    model = _TableLM([[0.0, 1.0], [1.0, 0.0]])
    batch = {"input_ids": torch.tensor([[0, 1]]), "labels": torch.tensor([[-100, -100]])}
    with pytest.raises(ValueError, match="labelled token"):
        teacher_forced_loss(model, [batch])
