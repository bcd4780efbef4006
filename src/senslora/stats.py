"""Per-module curvature statistics: what every estimator produces and what the metrics consume.

A `ModuleStats` holds the Hessian-diagonal estimate of one weight matrix. The default
(`activation`) estimator stores it compactly as one value per input column, since the GPTQ
layer-wise Hessian H = 2·XXᵀ gives weight (i, j) the diagonal entry 2·Σ_t x_tj² for every output
row i: O(d_in) memory per module instead of O(d_out·d_in). The gradient-based estimators
(`fisher`, `hutchinson`) store the full diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from senslora.config import SPECTRA, check_choice
from senslora.targets import LayerShape


@dataclass
class ModuleStats:
    """Curvature statistics of one adaptable weight matrix.

    Attributes:
        name: full module name, e.g. ``encoder.layer.3.attention.self.query``.
        shape: the layer geometry (d_out, d_in, whether the weight is stored transposed).
        estimator: the estimator that produced these statistics.
        column_values: (d_in,) float32, the Hessian diagonal per input column (activation only).
        diagonal: the full Hessian diagonal, shaped like the weight (gradient estimators only).
        gram: (d_in, d_in) float32 sum of 2·XXᵀ, only when asked for (``keep_gram=True``).
        num_tokens: real (non-padding) tokens seen (activation) or samples/probes averaged over.
    """

    name: str
    shape: LayerShape
    estimator: str
    column_values: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    num_tokens: int = 0

    def hessian_diagonal(self) -> torch.Tensor:
        """The Hessian diagonal shaped like the module's weight ((d_out, d_in) for nn.Linear).

        For the activation estimator this materialises d_out·d_in values (an expanded view of the
        column values, then a copy); the metrics never call it.
        """
        if self.diagonal is not None:
            return self.diagonal
        if self.column_values is None:
            raise ValueError(f"{self.name}: statistics hold neither a diagonal nor column values")
        rows = self.column_values.unsqueeze(0).expand(self.shape.out_features, -1)
        return (rows.t() if self.shape.transposed else rows).contiguous()

    def spectrum(self, kind: str = "diagonal") -> tuple[torch.Tensor, int]:
        """The entries the metrics rank, compactly: (values, multiplicity).

        The N = d_out·d_in entries are ``values`` each repeated ``multiplicity`` times.
        ``kind="eigenvalues"`` gives the eigenvalues of 2·XXᵀ instead of its diagonal (the weight
        Hessian is I_{d_out} ⊗ 2·XXᵀ, so each eigenvalue also repeats d_out times); it needs
        statistics collected with ``keep_gram=True``.
        """
        check_choice("spectrum", kind, SPECTRA)
        if kind == "eigenvalues":
            if self.gram is None:
                raise ValueError(
                    f"{self.name}: eigenvalue spectrum needs the activation estimator with "
                    "keep_gram=True"
                )
            eigenvalues = torch.linalg.eigvalsh(self.gram.double()).clamp_min(0.0)
            return eigenvalues, self.shape.out_features
        if self.column_values is not None:
            return self.column_values, self.shape.out_features
        return self.hessian_diagonal().reshape(-1), 1

    @property
    def num_entries(self) -> int:
        """N, the number of weights (diagonal entries) of this matrix."""
        return self.shape.out_features * self.shape.in_features
