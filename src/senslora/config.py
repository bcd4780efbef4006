"""Typed, validated configuration of the allocation stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEMES = ("sra", "pra")
BUDGETS = ("rank", "parameters")
SCORES = ("combined", "global", "local", "topk", "effective_rank")
WEIGHTINGS = ("std", "equal")
SPECTRA = ("diagonal", "eigenvalues")
NEGATIVE_MODES = ("abs", "clamp")


@dataclass(frozen=True)
class AllocationConfig:
    """How sensitivity metrics become per-module LoRA ranks.

    Defaults follow the paper (Appendix A.2): average rank 4, Top-k with k = N/2, effective-rank
    threshold 0.85, weights sigma/mu^2, scaled rank allocation (SRA).
    """

    avg_rank: int = 4
    """Average rank per adapted matrix; the budget is avg_rank x matrices (uniform LoRA r)."""
    budget: str = "rank"
    """'rank': ranks sum exactly to avg_rank x matrices (the paper). 'parameters': at most the
    trainable parameters of uniform LoRA r=avg_rank (a rank of a d_out x d_in matrix costs
    d_out + d_in)."""
    scheme: str = "sra"
    """'sra': ranks proportional to theta (eq. 15). 'pra': progressive levels around the average
    by theta order (Section 4.4)."""
    score: str = "combined"
    """What ranks are proportional to: 'combined' theta (eq. 14), or the ablations 'global' (trace
    only), 'local' (eq. 12 only), 'topk', 'effective_rank'."""
    weighting: str = "std"
    """Combination weights: 'std' = sigma/mu^2 (eqs. 11, 13) or 'equal' = 0.5/mu (Appendix B.1)."""
    top_k_fraction: float = 0.5
    """k of the Top-k metric as a fraction of the matrix's N diagonal entries (eq. 9)."""
    effective_rank_threshold: float = 0.85
    """alpha of the effective-rank metric: cumulative share to reach (eq. 10)."""
    spectrum: str = "diagonal"
    """Entries the effective rank counts: 'diagonal' of the Hessian (default) or 'eigenvalues' of
    2XX^T (activation estimator with keep_gram=True)."""
    negative: str = "abs"
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
        for name, allowed in (
            ("budget", BUDGETS),
            ("scheme", SCHEMES),
            ("score", SCORES),
            ("weighting", WEIGHTINGS),
            ("spectrum", SPECTRA),
            ("negative", NEGATIVE_MODES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        _positive_int("avg_rank", self.avg_rank)
        _positive_int("pra_categories", self.pra_categories)
        _positive_int("pra_step", self.pra_step)
        if not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise ValueError(f"min_rank must be an integer >= 0, got {self.min_rank!r}")
        if self.max_rank is not None:
            _positive_int("max_rank", self.max_rank)
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
        return cls(**data)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


METHODS = (
    "lora",
    "senslora",
    "senslora-global",
    "senslora-local",
    "senslora-pra",
    "adalora",
    "hyperadalora",
    "eva",
)
HYPERADALORA_INITS = ("uniform", "senslora")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: method x task x seed. Defaults follow the paper (Appendix A.2) where
    they fit a CPU: AdamW, lr 5e-4, batch 32, average rank 4; fewer epochs than the paper's 10."""

    method: str = "senslora"
    """lora | senslora | senslora-global | senslora-local | senslora-pra | adalora |
    hyperadalora | eva."""
    task: str = "glue:rte"
    """Task spec: glue:<task>, rotten_tomatoes, csv:PATH, jsonl:PATH, gen:PATH, wikipedia_lead."""
    model: str | None = None
    """Model id, folder or built-in name (minilm, smollm2); None: the shipped MiniLM."""
    glue_dir: str | None = None
    """Folder in the glue_data layout; None reads GLUE from the Hugging Face hub."""
    avg_rank: int = 4
    """Average rank per adapted matrix, the same for every method (rank budget)."""
    lora_alpha: float | None = None
    """lora_alpha of uniform LoRA; None: 2 x avg_rank. Other methods keep the same alpha/r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: str = "all-linear"
    """Adapted modules: all-linear, comma-separated names, or a regex."""
    learning_rate: float = 5e-4
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    """Max tokens per example (dynamic padding to the longest in each batch)."""
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0
    train_limit: int | None = None
    """Use a fixed subset of this many training examples (the same subset for every seed)."""
    dev_limit: int | None = None
    calib: str = "wikipedia"
    """Calibration source for senslora methods ('task' = the task's own training texts)."""
    calib_samples: int = 128
    calib_seq_len: int = 128
    estimator: str = "activation"
    max_rank: int | None = None
    """senslora methods: cap on the rank of any one matrix (None: min(d_in, d_out))."""
    budget: str = "rank"
    """senslora methods: 'rank' (the total rank of uniform LoRA) or 'parameters' (at most uniform
    LoRA's parameter count)."""
    adalora_init_rank: int | None = None
    """AdaLoRA's initial rank; None: 1.5 x avg_rank (it prunes down to avg_rank on average).
    HyperAdaLoRA's too (its init factor is adalora_init_rank / avg_rank)."""
    hyperadalora_init: str = "uniform"
    """HyperAdaLoRA's initial ranks: 'uniform' (AdaLoRA's initial rank everywhere) or
    'senslora' (the senslora allocation times the init factor; same target budget)."""
    hyperadalora_width: int = 32
    """Width of HyperAdaLoRA's hypernetwork tokens (a multiple of 4, its attention heads)."""
    hyperadalora_residual: bool = True
    """Add a free per-module residual to the generated P and Q (lambda stays generated)."""
    eval_steps: int = 0
    """0: evaluate every epoch; N > 0: every N optimizer steps and at the end (results.json
    'evals' holds every evaluation with its step; train losses are then logged every N steps)."""
    eva_rho: float = 2.0
    """EVA's rank redistribution factor (max rank = rho x avg_rank)."""
    max_new_tokens: int = 48
    """Generation tasks: greedy decoding length on the dev set."""
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in (
            "avg_rank",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "max_length",
            "calib_samples",
            "calib_seq_len",
            "max_new_tokens",
            "hyperadalora_width",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("train_limit", "dev_limit", "adalora_init_rank", "max_rank"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.hyperadalora_init not in HYPERADALORA_INITS:
            raise ValueError(
                f"hyperadalora_init must be one of {HYPERADALORA_INITS}, "
                f"got {self.hyperadalora_init!r}"
            )
        if self.hyperadalora_width % 4:
            raise ValueError(
                f"hyperadalora_width must be a multiple of 4, got {self.hyperadalora_width}"
            )
        if not isinstance(self.hyperadalora_residual, bool):
            raise ValueError(
                f"hyperadalora_residual must be a bool, got {self.hyperadalora_residual!r}"
            )
        steps = self.eval_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"eval_steps must be an integer >= 0, got {steps!r}")
        if self.eva_rho < 1.0:
            raise ValueError(f"eva_rho must be >= 1, got {self.eva_rho}")

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.avg_rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
