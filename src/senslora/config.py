"""Typed, validated configuration of the allocation stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

Scheme = Literal["sra", "pra"]
Budget = Literal["rank", "parameters"]
Score = Literal["combined", "global", "local", "topk", "effective_rank"]
Weighting = Literal["std", "equal"]
Spectrum = Literal["diagonal", "eigenvalues"]
NegativeMode = Literal["abs", "clamp"]
Curvature = Literal["hessian", "inverse"]

# The allowed values of each choice, declared once above and read everywhere from here.
SCHEMES: tuple[str, ...] = get_args(Scheme)
BUDGETS: tuple[str, ...] = get_args(Budget)
SCORES: tuple[str, ...] = get_args(Score)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
SPECTRA: tuple[str, ...] = get_args(Spectrum)
NEGATIVE_MODES: tuple[str, ...] = get_args(NegativeMode)
CURVATURES: tuple[str, ...] = get_args(Curvature)
DEFAULT_BUDGET: dict[str, str] = {"sra": "parameters", "pra": "rank"}
"""The budget when none is given, per scheme: PRA's levels around the average are a rank budget."""


@dataclass(frozen=True)
class AllocationConfig:
    """How sensitivity metrics become per-module LoRA ranks.

    Defaults follow the paper (Appendix A.2): average rank 4, Top-k with k = N/2, effective-rank
    threshold 0.85, weights sigma/mu^2, scaled rank allocation (SRA).
    """

    avg_rank: int = 4
    """Average rank per adapted matrix; the budget is avg_rank x matrices (uniform LoRA r)."""
    budget: Budget | None = None
    """None: the scheme's `DEFAULT_BUDGET`. 'parameters' (SRA's default): at most the trainable
    parameters of uniform LoRA r=avg_rank (a rank of a d_out x d_in matrix costs d_out + d_in),
    the paper's rule for comparing methods (Appendix A.2). 'rank': ranks sum exactly to
    avg_rank x matrices (the paper's Section 4.4), which on MiniLM trains 26% more parameters
    than uniform LoRA (docs/method.md, "Budget")."""
    scheme: Scheme = "sra"
    """'sra': ranks proportional to theta (eq. 15). 'pra': progressive levels around the average
    by theta order (Section 4.4)."""
    score: Score = "combined"
    """What ranks are proportional to: 'combined' theta (eq. 14), or the ablations 'global' (trace
    only), 'local' (eq. 12 only), 'topk', 'effective_rank'."""
    weighting: Weighting = "std"
    """Combination weights: 'std' = sigma/mu^2 (eqs. 11, 13) or 'equal' = 0.5/mu (Appendix B.1)."""
    top_k_fraction: float = 0.5
    """k of the Top-k metric as a fraction of the matrix's N diagonal entries (eq. 9)."""
    effective_rank_threshold: float = 0.85
    """alpha of the effective-rank metric: cumulative share to reach (eq. 10)."""
    spectrum: Spectrum = "diagonal"
    """Entries the effective rank counts: 'diagonal' of the Hessian (default) or 'eigenvalues' of
    2XX^T (activation estimator with keep_gram=True)."""
    curvature: Curvature = "hessian"
    """What the metrics read per weight: 'hessian', the Hessian diagonal h_qq (eqs. 6-10), or
    'inverse', 1/[(H + lambda I)^-1]_qq, the curvature after the other weights of the row
    compensate (OBS/GPTQ, Section 4.6; lambda = 0.01 x mean diag H, via Cholesky). 'inverse'
    needs the activation estimator with keep_gram=True and the diagonal spectrum."""
    negative: NegativeMode = "abs"
    """Negative Hessian-diagonal entries (Hutchinson): 'abs' or 'clamp' to zero."""
    min_rank: int = 1
    """Smallest rank of any matrix; 0 lets a matrix go without an adapter."""
    max_rank: int | None = None
    """Largest rank of any matrix (never above min(d_in, d_out)); None: min(d_in, d_out)."""
    pra_categories: int = 3
    """PRA: number of rank levels."""
    pra_step: int = 1
    """PRA: rank difference between consecutive levels."""

    def __post_init__(self) -> None:
        check_choice("scheme", self.scheme, SCHEMES)
        if self.budget is None:
            object.__setattr__(self, "budget", DEFAULT_BUDGET[self.scheme])
        if self.scheme == "pra" and self.budget != "rank":
            raise ValueError(
                f"the PRA scheme places ranks on levels around the average and supports "
                f"budget='rank' only, got budget={self.budget!r}"
            )
        for name, allowed in (
            ("budget", BUDGETS),
            ("scheme", SCHEMES),
            ("score", SCORES),
            ("weighting", WEIGHTINGS),
            ("spectrum", SPECTRA),
            ("negative", NEGATIVE_MODES),
            ("curvature", CURVATURES),
        ):
            check_choice(name, getattr(self, name), allowed)
        if self.curvature == "inverse" and self.spectrum == "eigenvalues":
            raise ValueError(
                "curvature='inverse' replaces the Hessian diagonal and needs spectrum='diagonal', "
                "got spectrum='eigenvalues'"
            )
        positive_int("avg_rank", self.avg_rank)
        positive_int("pra_categories", self.pra_categories)
        positive_int("pra_step", self.pra_step)
        if not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise ValueError(f"min_rank must be an integer >= 0, got {self.min_rank!r}")
        if self.max_rank is not None:
            positive_int("max_rank", self.max_rank)
            if self.max_rank < self.min_rank:
                raise ValueError(
                    f"max_rank must be >= min_rank, got max_rank={self.max_rank} and "
                    f"min_rank={self.min_rank}"
                )
        if self.min_rank > self.avg_rank:
            raise ValueError(
                f"min_rank must not exceed avg_rank, got min_rank={self.min_rank} and "
                f"avg_rank={self.avg_rank}"
            )
        if not 0.0 < self.top_k_fraction <= 1.0:
            raise ValueError(f"top_k_fraction must be in (0, 1], got {self.top_k_fraction}")
        if not 0.0 < self.effective_rank_threshold <= 1.0:
            raise ValueError(
                f"effective_rank_threshold must be in (0, 1], got {self.effective_rank_threshold}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AllocationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AllocationConfig fields {unknown}; known: {sorted(known)}")
        if "budget" in data and data["budget"] is None:  # a saved config names its budget
            raise ValueError(f"budget must be one of {BUDGETS}, got None")
        return cls(**data)


def default_of(name: str) -> Any:
    """The default of AllocationConfig field ``name``: read by the CLI and the harness, so that
    each default is declared once, above."""
    return AllocationConfig.__dataclass_fields__[name].default


def positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
