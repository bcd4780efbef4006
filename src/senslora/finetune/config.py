"""Typed, validated configuration of one fine-tuning run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from senslora.config import BUDGETS, positive_int

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
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "last", "pooler")
"""Sentence embeddings a classification head can sit on (see senslora.finetune.heads.pool)."""
HEAD_LR_FACTOR = 10.0
"""head_learning_rate=None: the new head trains at this many times the adapters' rate."""


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
    """Learning rate of the adapters (and of any hypernetwork)."""
    head_learning_rate: float | None = None
    """Learning rate of the freshly initialised classification / regression head; None:
    HEAD_LR_FACTOR x learning_rate (benchmarks/head_check.py: at the adapters' rate the head
    barely moves in a short run)."""
    pooling: str = "auto"
    """Sentence embedding under the head: 'auto' (what the model was trained with: its
    sentence-transformers Pooling config, else its own pooler, else mean), or one of mean, cls,
    max, mean_sqrt_len, last, pooler."""
    standardize_targets: bool = True
    """Regression tasks: the loss sees (y - mean) / std of the training targets; predictions
    are mapped back to the task's units."""
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
            positive_int(name, getattr(self, name))
        for name in ("train_limit", "dev_limit", "adalora_init_rank", "max_rank"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(
                f"head_learning_rate must be > 0 or None, got {self.head_learning_rate}"
            )
        if self.pooling != "auto" and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'auto' or one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.standardize_targets, bool):
            raise ValueError(
                f"standardize_targets must be a bool, got {self.standardize_targets!r}"
            )
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
    def head_lr(self) -> float:
        """The head's learning rate: head_learning_rate, or HEAD_LR_FACTOR x learning_rate."""
        if self.head_learning_rate is not None:
            return self.head_learning_rate
        return HEAD_LR_FACTOR * self.learning_rate

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.avg_rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
