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


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 6),
    width=st.integers(1, 30),
    data=st.data(),
    multiplicity=st.sampled_from([1, 2, 7, 384]),
    fraction=st.sampled_from([0.5, 1 / 3, 1.0, 0.01]),
    alpha=st.sampled_from([0.85, 0.5, 1.0, 0.999]),
    float32=st.booleans(),
)
def test_rows_at_once_equal_spectrum_metrics_row_by_row(
    rows, width, data, multiplicity, fraction, alpha, float32
):
    """Ties, zeros, all-zero rows and very different magnitudes: bit for bit."""
    entry = st.one_of(
        st.just(0.0), st.sampled_from([1.0, 3.0]), st.floats(0.0, 1e6, allow_nan=False)
    )
    values = data.draw(
        st.lists(st.lists(entry, min_size=width, max_size=width), min_size=rows, max_size=rows)
    )
    table = torch.tensor(values, dtype=torch.float32 if float32 else torch.float64)
    k = metrics.top_k_count(width * multiplicity, fraction)
    traces, top_k_means, effective_ranks = metrics.spectrum_metrics_rows(
        table, multiplicity, k=k, alpha=alpha
    )
    for i, row in enumerate(table):
        expected = metrics.spectrum_metrics(row, multiplicity, k=k, alpha=alpha)
        assert (float(traces[i]), float(top_k_means[i]), int(effective_ranks[i])) == expected


def test_rows_at_once_on_realistic_sizes_equal_row_by_row():
    """MiniLM-like shapes (384 and 1536 columns, multiplicity 384 / 1536), heavy-tailed values."""
    generator = torch.Generator().manual_seed(0)
    for width, multiplicity in ((384, 384), (384, 1536), (1536, 384)):
        table = torch.rand(6, width, generator=generator).pow(8) * 1e4  # float32
        k = metrics.top_k_count(width * multiplicity, 0.5)
        got = metrics.spectrum_metrics_rows(table, multiplicity, k=k, alpha=0.85)
        for i, row in enumerate(table):
            expected = metrics.spectrum_metrics(row, multiplicity, k=k, alpha=0.85)
            assert (float(got[0][i]), float(got[1][i]), int(got[2][i])) == expected


def test_rows_at_once_validate_like_spectrum_metrics():
    with pytest.raises(ValueError, match="non-negative"):
        metrics.spectrum_metrics_rows(torch.tensor([[1.0, 2.0], [1.0, -1.0]]), k=1)
    with pytest.raises(ValueError, match="finite"):
        metrics.spectrum_metrics_rows(torch.tensor([[1.0, float("nan")]]), k=1)
    with pytest.raises(ValueError, match="alpha"):
        metrics.spectrum_metrics_rows(torch.tensor([[1.0]]), k=1, alpha=0.0)
    with pytest.raises(ValueError, match="k must be"):
        metrics.spectrum_metrics_rows(torch.tensor([[1.0]]), 2, k=3)
    with pytest.raises(ValueError, match=r"rows, entries.*\(3,\)"):
        metrics.spectrum_metrics_rows(torch.tensor([1.0, 2.0, 3.0]), k=1)
