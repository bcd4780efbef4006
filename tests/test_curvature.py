"""The inverse-Hessian curvature option against an exact reference (torch.linalg.inv)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, token_batches

from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.allocation import module_metrics
from senslora.curvature import damped_inverse_diagonal, inverse_curvature, with_curvature


def correlated_gram(d_in: int = 6, tokens: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    inputs = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64) @ mixing
    return 2 * inputs.t() @ inputs  # H = 2 XX^T, X: (d_in, tokens)


def reference_inverse_diagonal(gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    damped = gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.inv(damped).diagonal()


def test_damped_inverse_diagonal_matches_the_exact_inverse():
    gram = correlated_gram()
    torch.testing.assert_close(
        damped_inverse_diagonal(gram), reference_inverse_diagonal(gram), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        damped_inverse_diagonal(gram, damping=0.5),
        reference_inverse_diagonal(gram, 0.5),
        rtol=1e-10,
        atol=0,
    )


def test_rank_deficient_gram_is_handled_by_the_damping():
    gram = correlated_gram(d_in=8, tokens=3)  # rank 3 < 8: singular without damping
    values = inverse_curvature(gram)
    torch.testing.assert_close(values, 1 / reference_inverse_diagonal(gram), rtol=1e-8, atol=0)
    assert bool((values > 0).all())


def test_inverse_curvature_is_the_diagonal_for_uncorrelated_columns_and_below_it_otherwise():
    diagonal = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    damping = 0.01 * diagonal.mean()
    torch.testing.assert_close(inverse_curvature(torch.diag(diagonal)), diagonal + damping)
    gram = correlated_gram()
    damped_diagonal = gram.diagonal() + 0.01 * gram.diagonal().mean()
    assert bool((inverse_curvature(gram) < damped_diagonal).all())  # Schur complement < h_qq


def test_bad_grams_are_clear_errors():
    with pytest.raises(ValueError, match="square"):
        damped_inverse_diagonal(torch.ones(2, 3))
    with pytest.raises(ValueError, match="all-zero"):
        damped_inverse_diagonal(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="positive definite"):
        damped_inverse_diagonal(torch.tensor([[1.0, 5.0], [5.0, 1.0]]))


def test_inverse_option_feeds_the_metrics_the_exact_inverse_curvature():
    stats = collect_statistics(tiny_bert(), token_batches(num_batches=2), keep_gram=True)
    config = AllocationConfig(curvature="inverse")
    table = module_metrics(stats, config)
    for name, s in stats.items():
        torch.testing.assert_close(s.gram.diagonal(), s.column_values, rtol=1e-5, atol=1e-6)
        expected = 1 / reference_inverse_diagonal(s.gram.double())
        trace = s.shape.out_features * float(expected.sum())
        assert table[name]["trace"] == pytest.approx(trace, rel=1e-9)
    default = allocate_ranks(stats, AllocationConfig())
    inverse = allocate_ranks(stats, config)
    assert default.metrics != inverse.metrics
    assert inverse.total_rank == default.total_rank


def test_inverse_needs_the_gram_and_the_diagonal_spectrum():
    stats = collect_statistics(tiny_bert(), token_batches(num_batches=1))
    with pytest.raises(ValueError, match="keep_gram=True"):
        allocate_ranks(stats, AllocationConfig(curvature="inverse"))
    with pytest.raises(ValueError, match="spectrum='diagonal'"):
        AllocationConfig(curvature="inverse", spectrum="eigenvalues")
    with pytest.raises(ValueError, match="curvature must be one of"):
        AllocationConfig(curvature="newton")
    assert with_curvature(stats, "hessian") == stats  # the default leaves statistics alone
