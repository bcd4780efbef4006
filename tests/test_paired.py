"""Paired comparisons over seeds against scipy and hand computations, and in the grid tables."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from senslora.finetune.paired import holm, paired_summary
from senslora.finetune.tables import aggregate, render_markdown


def test_paired_summary_matches_scipy_on_the_differences():
    method = [60.1, 58.3, 61.0, 59.4, 62.2]
    reference = [58.0, 58.9, 59.1, 57.2, 60.0]
    diffs = [m - r for m, r in zip(method, reference, strict=True)]
    result = paired_summary(diffs)
    assert result["n"] == 5 and result["wins"] == 4
    assert result["mean"] == pytest.approx(sum(diffs) / 5)
    assert result["p"] == pytest.approx(stats.ttest_rel(method, reference).pvalue)
    low, high = stats.t.interval(0.95, 4, loc=result["mean"], scale=stats.sem(diffs))
    assert result["ci95"] == pytest.approx([low, high])


def test_paired_summary_edge_cases():
    assert paired_summary([])["n"] == 0
    one = paired_summary([1.5])
    assert (one["ci95"], one["p"], one["wins"]) == (None, None, 1)
    assert paired_summary([0.0, 0.0, 0.0])["p"] == 1.0
    same = paired_summary([2.0, 2.0])  # no spread: the t-test is undefined, not p = 0
    assert (same["p"], same["ci95"], same["no_spread"]) == (None, None, True)
    rounded = paired_summary([0.19 - 0.20, 0.20 - 0.21])  # unequal in the last float bit only
    assert rounded["p"] is None and rounded["no_spread"]


def test_holm_against_a_hand_computation():
    # sorted: 0.01 (x3), 0.03 (x2), 0.04 (x1) -> 0.03, 0.06, 0.06 (monotone)
    adjusted = holm({"rte": 0.04, "mrpc": 0.01, "cola": 0.03, "sst2": None})
    assert adjusted == pytest.approx({"rte": 0.06, "mrpc": 0.03, "cola": 0.06, "sst2": None})
    assert holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}  # capped at 1


def run(method: str, task: str, seed: int, value: float) -> dict:
    return {
        "method": method,
        "task": task,
        "config": {"seed": seed},
        "main_metric": "accuracy",
        "last": {"accuracy": value / 100},
        "best": {"accuracy": value / 100},
        "parameters": {"lora": 10},
    }


def test_the_grid_compares_every_method_with_every_reference_and_corrects_over_tasks():
    scores = {
        "lora": {"a": [50, 52, 51], "b": [70, 71, 69]},
        "senslora": {"a": [53, 54, 53.5], "b": [70.5, 70, 70.2]},
        "size-prior": {"a": [52, 51, 50], "b": [71, 72, 70]},
    }
    results = [
        run(method, task, seed, value)
        for method, by_task in scores.items()
        for task, values in by_task.items()
        for seed, value in enumerate(values)
    ]
    summary = aggregate(results, list(scores), ["a", "b"], references=("lora", "senslora"))
    table = summary["table"]
    vs_lora = table["senslora"]["a"]["diff_vs_lora"]
    expected = stats.ttest_rel(scores["senslora"]["a"], scores["lora"]["a"]).pvalue
    other = stats.ttest_rel(scores["senslora"]["b"], scores["lora"]["b"]).pvalue
    assert vs_lora["p"] == pytest.approx(expected)
    assert vs_lora["p_holm"] == pytest.approx(min(1.0, max(2 * min(expected, other), expected)))
    assert vs_lora["wins"] == 3
    control = table["size-prior"]["a"]["diff_vs_senslora"]
    assert control["mean"] == pytest.approx(-(1 + 3 + 3.5) / 3)
    assert control["wins"] == 0
    assert "diff_vs_senslora" not in table["senslora"]["a"]
    text = render_markdown(summary)
    assert "Paired difference to `senslora`" in text
    assert f"{vs_lora['mean']:+.2f} [" in text
    assert math.isfinite(vs_lora["ci95"][0])


def test_the_average_column_pairs_the_task_averaged_scores_of_complete_seeds():
    scores = {
        "lora": {"a": [50, 52, 51, 49], "b": [70, 71, 69, 70]},
        "senslora": {"a": [53, 54, 53.5, 50], "b": [70.5, 70, 70.2, None]},
    }
    results = [
        run(method, task, seed, value)
        for method, by_task in scores.items()
        for task, values in by_task.items()
        for seed, value in enumerate(values)
        if value is not None  # seed 3 of senslora misses task b: left out of the average
    ]
    summary = aggregate(results, list(scores), ["a", "b"], references=("lora",))
    average = summary["table"]["senslora"]["average"]["diff_vs_lora"]
    per_seed = [
        ((53 - 50) + (70.5 - 70)) / 2,
        ((54 - 52) + (70 - 71)) / 2,
        ((53.5 - 51) + (70.2 - 69)) / 2,
    ]
    assert average["n"] == 3
    assert average["mean"] == pytest.approx(sum(per_seed) / 3)
    assert average["p"] == pytest.approx(stats.ttest_1samp(per_seed, 0.0).pvalue)
    assert average["p_holm"] == average["p"]
    text = render_markdown(summary)
    assert "| method | a | b | Avg. |" in text
    assert f"{average['mean']:+.2f} [" in text.split("Paired difference")[1]
