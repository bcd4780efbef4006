"""Paired comparisons of two methods over seeds: the mean difference with its 95% interval, a
paired t-test, the seeds won, and Holm's correction over several tasks. Pure functions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def paired_summary(differences: Sequence[float], better: str = "higher") -> dict[str, Any]:
    """``differences`` (method − reference, one per seed, same seed on both sides) ->
    n, mean, std, the 95% t-interval of the mean (``ci95`` = [low, high]), the two-sided
    p-value of the paired t-test (the one-sample t-test of the differences against 0), and
    ``wins``: how many differences are > 0 (< 0 with ``better="lower"``, for a loss). With one
    difference the interval and p are None. With differences that are all equal the t statistic
    is undefined (0/0 or x/0): p is 1.0 when they are all 0, else None, with ``"no_spread":
    True``: a few seeds that happen to differ by the same number of examples are not
    evidence of anything (p 0 would claim certainty)."""
    from scipy import stats

    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    values = [float(d) for d in differences]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "p": None, "wins": 0}
    mean = statistics.fmean(values)
    wins = sum(d > 0 if better == "higher" else d < 0 for d in values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "ci95": None, "p": None, "wins": wins}
    std = statistics.stdev(values)
    if std <= 1e-9 * max(1.0, abs(mean)):  # equal up to float rounding (82.35 - 81.86, ...)
        if abs(mean) <= 1e-12:
            return {"n": n, "mean": 0.0, "std": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "wins": wins}
        return {
            "n": n,
            "mean": mean,
            "std": 0.0,
            "ci95": None,
            "p": None,
            "wins": wins,
            "no_spread": True,
        }
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    p = float(stats.ttest_1samp(values, 0.0).pvalue)
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half],
        "p": p,
        "wins": wins,
    }


def holm(p_values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment of a family of p-values (None stays None): the i-th smallest
    of m is multiplied by m - i (i from 0), made monotone, capped at 1."""
    present = sorted((p, key) for key, p in p_values.items() if p is not None)
    m = len(present)
    adjusted: dict[str, float | None] = {key: None for key in p_values}
    running = 0.0
    for i, (p, key) in enumerate(present):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[key] = running
    return adjusted
