"""`spectrum_metrics` (one validation, one sort) gives exactly what the three metric functions
give one by one, for compact and full diagonals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora import metrics


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.just(0.0), st.floats(0.0, 1e6, allow_nan=False)), min_size=1, max_size=40
    ),
    multiplicity=st.integers(1, 7),
    fraction=st.sampled_from([0.5, 1 / 3, 1.0, 0.01]),
    alpha=st.sampled_from([0.85, 0.5, 1.0, 0.999]),
    float32=st.booleans(),
)
def test_spectrum_metrics_equal_the_separate_functions(
    values, multiplicity, fraction, alpha, float32
):
    tensor = torch.tensor(values, dtype=torch.float32 if float32 else torch.float64)
    k = metrics.top_k_count(tensor.numel() * multiplicity, fraction)
    together = metrics.spectrum_metrics(tensor, multiplicity, k=k, alpha=alpha)
    separate = (
        metrics.trace(tensor, multiplicity),
        metrics.top_k_mean(tensor, multiplicity, k=k),
        metrics.effective_rank(tensor, multiplicity, alpha=alpha),
    )
    assert together == separate


def test_spectrum_metrics_validate_like_the_separate_functions():
    with pytest.raises(ValueError, match="non-negative"):
        metrics.spectrum_metrics(torch.tensor([1.0, -1.0]), k=1)
    with pytest.raises(ValueError, match="finite"):
        metrics.spectrum_metrics(torch.tensor([1.0, float("nan")]), k=1)
    with pytest.raises(ValueError, match="alpha"):
        metrics.spectrum_metrics(torch.tensor([1.0]), k=1, alpha=0.0)
    with pytest.raises(ValueError, match="k must be"):
        metrics.spectrum_metrics(torch.tensor([1.0]), 2, k=3)
