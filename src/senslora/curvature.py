"""The inverse-Hessian reading of Section 4.6: per-column curvature with the interactions kept.

Eq. 6 drops the off-diagonal Hessian entries and ranks weights by h_qq. The layer-wise Hessian of
the activation estimator, H = 2·XXᵀ, is far from diagonal (neighbouring hidden units are
correlated), and GPTQ, which Section 4.6 follows, works with its damped inverse instead,
computed through a Cholesky factorisation "to enhance computational stability".

Optimal Brain Surgeon gives the inverse its meaning: when weight w_q of a row moves by δ and the
other weights of the row re-adjust to minimise the loss, the loss grows by ½·δ²/[H⁻¹]_qq. So
``1 / [H⁻¹]_qq`` is the curvature along w_q *after compensation* (the Schur complement of H on
the other columns). It is at most h_qq, equals h_qq when column q is uncorrelated with the
others (exactly eq. 6's assumption), and, like h_qq, is larger for more sensitive weights. It is
what ``AllocationConfig(curvature="inverse")`` feeds to the metrics in place of h_qq.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from senslora.stats import ModuleStats

__all__ = ["GPTQ_DAMPING", "damped_inverse_diagonal", "inverse_curvature", "with_curvature"]

GPTQ_DAMPING = 0.01
"""GPTQ's ``percdamp``: λ = 0.01 · mean(diag H) is added to the diagonal before inverting."""


def damped_inverse_diagonal(gram: torch.Tensor, damping: float = GPTQ_DAMPING) -> torch.Tensor:
    """``diag((H + λI)⁻¹)`` with ``λ = damping · mean(diag H)``, through a Cholesky factor.

    ``gram`` is H = 2·XXᵀ (d_in, d_in), symmetric positive semi-definite; the computation is in
    float64. As GPTQ does, H⁻¹ is formed from the Cholesky factor L of the damped H
    (``torch.cholesky_inverse``) rather than by a general inverse. Raises ``ValueError`` when
    ``gram`` is not square, when H is all zero (nothing to damp with) or when the damped H is not
    positive definite (non-finite or non-symmetric input).
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square (d_in, d_in) matrix, got shape {tuple(gram.shape)}")
    if not damping > 0:
        raise ValueError(f"expected damping > 0, got {damping}")
    hessian = gram.detach().to(torch.float64)
    diagonal = hessian.diagonal()
    if float(diagonal.mean()) <= 0.0:
        raise ValueError("expected a Hessian with a positive diagonal mean, got an all-zero one")
    damped = hessian + damping * diagonal.mean() * torch.eye(
        hessian.shape[0], dtype=hessian.dtype, device=hessian.device
    )
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise ValueError(
            f"expected a positive definite damped Hessian, got a failed Cholesky factorisation at "
            f"column {int(info) - 1} (non-finite or non-symmetric statistics?)"
        )
    return torch.cholesky_inverse(factor).diagonal().clone()


def inverse_curvature(gram: torch.Tensor, damping: float = GPTQ_DAMPING) -> torch.Tensor:
    """``1 / diag((H + λI)⁻¹)`` per input column: the OBS curvature after compensation (float64).

    Each of the d_out rows of the weight shares it (the layer-wise Hessian is I ⊗ H), as the
    default column values 2·Σ_t x_tq² do.
    """
    return damped_inverse_diagonal(gram, damping).reciprocal()


def with_curvature(
    stats: Mapping[str, ModuleStats], curvature: str, damping: float = GPTQ_DAMPING
) -> dict[str, ModuleStats]:
    """The statistics whose column values the metrics read under ``curvature``.

    ``"hessian"`` returns them unchanged (same objects); ``"inverse"`` replaces every module's
    column values by :func:`inverse_curvature` of its Gram matrix, which needs the activation
    estimator with ``keep_gram=True``.
    """
    if curvature == "hessian":
        return dict(stats)
    if curvature != "inverse":
        raise ValueError(f"curvature must be 'hessian' or 'inverse', got {curvature!r}")
    out = {}
    for name, s in stats.items():
        if s.gram is None or s.column_values is None:
            raise ValueError(
                f"{name}: curvature='inverse' needs the activation estimator with keep_gram=True, "
                f"got {s.estimator} statistics {'without' if s.gram is None else 'with'} a Gram "
                "matrix"
            )
        try:
            values = inverse_curvature(s.gram, damping)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        out[name] = replace(s, column_values=values)
    return out
