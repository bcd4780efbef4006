"""Typed, validated configuration of one fine-tuning run.

Each field's default and help text are declared here once; `senslora train` reads both from
here (`default_of`, `help_of`), so changing a default changes the command too.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from senslora.config import BUDGETS, check_choice, positive_int
from senslora.config import default_of as allocation_default
from senslora.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from senslora.finetune.heads import POOLINGS
from senslora.finetune.methods import METHODS
from senslora.finetune.tasks import parse_task_spec
from senslora.models import DTYPES

HYPERADALORA_INITS = ("uniform", "senslora")
MIXED_PRECISION = ("no", "bf16")


def option(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: method x task x seed. Defaults follow the paper (Appendix A.2) where
    they fit a CPU: AdamW, lr 5e-4, batch 32, average rank 4; fewer epochs than the paper's 10."""

    method: str = option("senslora", " | ".join(METHODS))
    task: str = option(
        "glue:rte",
        "glue:<cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli>, rotten_tomatoes, csv:PATH, "
        "jsonl:PATH, gen:PATH or wikipedia_lead.",
    )
    model: str | None = option(None, "Model id, folder, or a built-in: minilm (default), smollm2.")
    glue_dir: str | None = option(
        None, "Folder in the glue_data layout (default: GLUE from the Hugging Face hub)."
    )
    avg_rank: int = option(
        allocation_default("avg_rank"),
        "Average rank per adapted matrix, the same for every method.",
    )
    lora_alpha: float | None = option(
        None, "alpha of uniform LoRA (default 2 x avg-rank); other methods keep the same alpha/r."
    )
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.")
    targets: str = option(
        "all-linear", "Adapted modules: all-linear, comma-separated names, or a regex."
    )
    learning_rate: float = option(
        5e-4, "Peak learning rate of the adapters (AdamW, linear schedule)."
    )
    pooling: str = option(
        "auto",
        "Classification head: 'model' (the model's own sequence-classification head; for BERT "
        "a linear layer on its [CLS] pooler), 'auto' (a linear head on the pooling the model was "
        "trained with: its sentence-transformers Pooling config, else its pooler, else mean), "
        "or one of " + ", ".join(POOLINGS) + ".",
    )
    head_learning_rate: float | None = option(
        5e-3,
        "Learning rate of the freshly initialised head (None: the adapters' rate); "
        "benchmarks/head_check.py shows a head at the adapters' rate stalling in short runs.",
    )
    standardize_targets: bool = option(
        False,
        "Regression tasks with a pooled head: the loss sees (y - mean) / std of the training "
        "targets; predictions are mapped back to the task's units.",
    )
    epochs: int = option(3, "Training epochs (the paper uses 10).")
    batch_size: int = option(32, "Training batch size per device.")
    eval_batch_size: int = option(64, "Evaluation batch size per device.")
    max_length: int = option(128, "Max tokens per example (dynamic padding per batch).")
    warmup_ratio: float = option(0.06, "Share of the steps with a linear warm-up.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    seed: int = option(0, "Training seed (also the seed of the calibration sample).")
    train_limit: int | None = option(
        None, "Fixed subset of this many training examples (the same for every seed)."
    )
    dev_limit: int | None = option(None, "Fixed subset of this many dev examples.")
    calib: str = option(
        "wikipedia",
        "Calibration text of the activation statistics and of a causal LM's next-token Fisher: "
        "wikipedia, rotten_tomatoes, a local file, a hub dataset, or 'task' (the task's own "
        "training texts). A classifier's auto estimator reads labelled training examples instead.",
    )
    calib_samples: int = option(128, "Calibration sequences (sensitivity methods).")
    calib_seq_len: int = option(128, "Max tokens per calibration sequence.")
    estimator: str = option(
        DEFAULT_ESTIMATOR,
        " | ".join(ESTIMATORS) + " (sensitivity methods; auto: for a classifier, the Fisher of "
        "calib-samples labelled training examples; for a causal LM, the Fisher of the next-token "
        "loss on the calibration text; activation: the paper's statistics, on the calibration "
        "text; docs/method.md).",
    )
    skip_positions: int = option(
        0,
        "Activation estimator: leave the first N real tokens of every calibration sequence out "
        "of the statistics (attention sinks; docs/method.md, decoders).",
    )
    outlier_factor: float | None = option(
        None,
        "Activation estimator: leave out tokens whose layer-input norm exceeds this many times "
        "the batch median (massive activations; docs/method.md, decoders).",
    )
    max_rank: int | None = option(
        allocation_default("max_rank"),
        "Sensitivity methods: cap on the rank of any one matrix (default min(d_in, d_out)).",
    )
    budget: str | None = option(
        allocation_default("budget"),
        "Sensitivity methods: parameters (at most uniform LoRA's parameter count, the paper's "
        "A.2; the default) | rank (the total rank of uniform LoRA; PRA's default).",
    )
    adalora_init_rank: int | None = option(
        None, "AdaLoRA's and HyperAdaLoRA's initial rank (default 1.5 x avg-rank)."
    )
    hyperadalora_init: str = option(
        "uniform",
        "HyperAdaLoRA's initial ranks: uniform | senslora (the senslora allocation x the init "
        "factor; same target budget).",
    )
    hyperadalora_width: int = option(
        32, "Width of HyperAdaLoRA's hypernetwork tokens (a multiple of 4, its attention heads)."
    )
    hyperadalora_residual: bool = option(
        True, "Add a free per-module residual to HyperAdaLoRA's generated P and Q."
    )
    eval_steps: int = option(
        0, "Evaluate every N optimizer steps (0: every epoch); all go to results.json."
    )
    eval_at_start: bool = option(
        False,
        "Also evaluate before the first step (step 0 in results.json 'evals'): with LoRA's B = 0 "
        "start, the untuned model's row.",
    )
    eva_rho: float = option(2.0, "EVA's rank redistribution factor (max rank = rho x avg rank).")
    max_new_tokens: int = option(48, "Generation tasks: greedy decoding length on the dev set.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    dtype: str = option("float32", " | ".join(DTYPES) + ".")
    mixed_precision: str = option(
        "no",
        "no | bf16: train and evaluate under bfloat16 autocast while the weights and optimizer "
        "state stay in --dtype (the Trainer's bf16), on a GPU or on a CPU with bfloat16 matrix "
        "instructions (AVX512-BF16, AMX); --dtype bfloat16 on a GPU implies it.",
    )

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(METHODS))
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.budget is not None:
            check_choice("budget", self.budget, BUDGETS)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("hyperadalora_init", self.hyperadalora_init, HYPERADALORA_INITS)
        check_choice("pooling", self.pooling, ("model", "auto", *POOLINGS))
        parse_task_spec(self.task)
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
        self._check_numbers()
        if not isinstance(self.calib, str) or not self.calib.strip():
            raise ValueError(f"calib must be a non-empty string, got {self.calib!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
                ) from None

    def _check_numbers(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
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
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(
                f"head_learning_rate must be > 0 or None, got {self.head_learning_rate}"
            )
        if not isinstance(self.standardize_targets, bool):
            raise ValueError(
                f"standardize_targets must be a bool, got {self.standardize_targets!r}"
            )
        skip = self.skip_positions
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip_positions must be an integer >= 0, got {skip!r}")
        if self.outlier_factor is not None and not self.outlier_factor > 1:
            raise ValueError(f"outlier_factor must be > 1 or None, got {self.outlier_factor!r}")
        if not isinstance(self.eval_at_start, bool):
            raise ValueError(f"eval_at_start must be a bool, got {self.eval_at_start!r}")
        if self.eva_rho < 1.0:
            raise ValueError(f"eva_rho must be >= 1, got {self.eva_rho}")

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.avg_rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def default_of(name: str) -> Any:
    """The default of TrainConfig field ``name``."""
    default = _FIELDS[name].default
    return None if default is MISSING else default


def help_of(name: str) -> str:
    """The help text of TrainConfig field ``name``."""
    return _FIELDS[name].metadata["help"]
