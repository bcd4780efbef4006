"""Classification and regression heads that fit the encoder they sit on.

``AutoModelForSequenceClassification`` puts a fresh linear layer on BERT's pooler (tanh of a
dense layer over [CLS]). A sentence-transformers model such as the shipped MiniLM was trained
with *mean* pooling and never used that pooler, and a fresh head trained at the adapters'
learning rate (5e-4) hardly moves in a short run: the baseline stalls at chance.
This module gives the harness

- :func:`read_pooling`: the pooling a model folder was trained with (its sentence-transformers
  ``Pooling`` config), else its own pooler when its weights hold one, else mean pooling;
- :class:`PooledClassifier`: backbone + pooling + a head named ``classifier`` (so that peft's
  ``SEQ_CLS`` task puts it in ``modules_to_save``) and module names identical to
  ``AutoModelForSequenceClassification``'s (``bert.encoder.layer.0...``), so target lists and
  saved allocations carry over; the head can hold regression-target statistics
  (:class:`TargetStats`) so that the loss sees standardised targets while the logits stay in the
  task's units;
- :func:`optimizer_groups`: a learning rate for the new head of its own.

The frozen-encoder baseline is :func:`senslora.finetune.probe.frozen_probe`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "POOLINGS",
    "PooledClassifier",
    "PooledHead",
    "TargetStats",
    "fit_target_stats",
    "is_head_parameter",
    "load_classifier",
    "optimizer_groups",
    "pool",
    "read_pooling",
]
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "last", "pooler")
"""Sentence embeddings a pooled head can sit on (see `pool`)."""
HEAD_NAME = "classifier"
"""Attribute name of the head: one of the names peft's SEQ_CLS task saves by default."""
_ST_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last",
}


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def read_pooling(model_path: str | Path) -> str:
    """The pooling ``model_path`` was trained with.

    1. a sentence-transformers folder: the ``Pooling`` module named in ``modules.json`` (or
       ``1_Pooling/config.json``); exactly one pooling mode must be on;
    2. else ``"pooler"`` when the checkpoint holds pooler weights (BERT's pretraining pooler);
    3. else ``"mean"``.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {folder} does not exist (pooling 'auto' reads a local folder; "
            "choose a pooling for a hub id)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    st_config = _sentence_transformers_pooling_file(folder)
    if st_config is not None:
        modes = json.loads(st_config.read_text())
        chosen = [_ST_MODES[key] for key in _ST_MODES if modes.get(key)]
        others = [k for k, v in modes.items() if k.startswith("pooling_mode") and v]
        if len(chosen) != 1 or len(others) != 1:
            raise ValueError(
                f"expected exactly one supported pooling mode in {st_config}, got {others}"
            )
        return chosen[0]
    return "pooler" if _has_pooler_weights(folder) else "mean"


def _sentence_transformers_pooling_file(folder: Path) -> Path | None:
    modules = folder / "modules.json"
    if modules.is_file():
        for entry in json.loads(modules.read_text()):
            if str(entry.get("type", "")).endswith(".Pooling"):
                return folder / entry.get("path", "") / "config.json"
    default = folder / "1_Pooling" / "config.json"
    return default if default.is_file() else None


def _has_pooler_weights(folder: Path) -> bool:
    """Whether the checkpoint's tensor names include a pooler (safetensors, sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text()).get("weight_map", {})
    elif (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", framework="pt") as weights:
            names = list(weights.keys())
    else:
        return False
    return any(".pooler." in f".{name}" for name in names)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) token states -> (B, d) over the real tokens (attention_mask 1) only: their
    mean, their max, [CLS] (the first token), their sum / sqrt(length) (sentence-transformers'
    ``mean_sqrt_len_tokens``) or the last real token (decoders; right or left padding)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling in ("mean", "mean_sqrt_len"):
        summed = (hidden * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1.0)
        return summed / (count if pooling == "mean" else count.sqrt())
    if pooling == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if pooling == "last":  # the last real token, for right or left padding
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS[:-1]} here, got {pooling!r}")


@dataclass(frozen=True)
class TargetStats:
    """Mean and standard deviation of regression targets (fitted on the training set)."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"expected a finite mean and std > 0, got {self.mean}, {self.std}")

    def standardize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def restore(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std + self.mean


def fit_target_stats(labels) -> TargetStats:
    """Mean and (population) standard deviation of ``labels``; a constant target is an error."""
    values = torch.as_tensor(list(labels), dtype=torch.float64)
    if values.numel() < 2:
        raise ValueError(f"expected at least two regression targets, got {values.numel()}")
    std = float(values.std(unbiased=False))
    if std == 0:
        raise ValueError("expected regression targets that vary, got a constant")
    return TargetStats(float(values.mean()), std)


class PooledHead(nn.Module):
    """Dropout + linear map of the pooled embedding. For regression with target statistics the
    linear output is a standardised score and ``forward`` returns it in the task's units: the
    statistics are buffers, saved and reloaded with the head."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, targets=None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)
        if targets is not None and num_labels != 1:
            raise ValueError(f"target statistics need num_labels == 1, got {num_labels}")
        stats = targets or TargetStats(0.0, 1.0)
        self.register_buffer("target_mean", torch.tensor(stats.mean))
        self.register_buffer("target_std", torch.tensor(stats.std))

    def standardized(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(pooled))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        raw = self.standardized(pooled)
        return raw * self.target_std + self.target_mean if raw.shape[-1] == 1 else raw


class PooledClassifier(nn.Module):
    """A transformers backbone (``AutoModel``), a pooling and a :class:`PooledHead` named
    ``classifier``. ``forward`` returns ``SequenceClassifierOutput(loss, logits)``: cross-entropy,
    or for ``num_labels == 1`` the MSE of the standardised score against standardised labels."""

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: int,
        pooling: str,
        *,
        dropout: float | None = None,
        targets: TargetStats | None = None,
    ):
        super().__init__()
        check_pooling(pooling)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(
                f"pooling 'pooler' needs a backbone with a pooler, got {type(backbone)}"
            )
        self.prefix = getattr(backbone, "base_model_prefix", "") or "backbone"
        setattr(self, self.prefix, backbone)  # bert.encoder... as in *ForSequenceClassification
        self.config = backbone.config
        self.config.num_labels = num_labels
        self.pooling = pooling
        if dropout is None:
            dropout = getattr(self.config, "classifier_dropout", None)
            dropout = (
                getattr(self.config, "hidden_dropout_prob", 0.1) if dropout is None else dropout
            )
        self.classifier = PooledHead(self.config.hidden_size, num_labels, dropout, targets)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.prefix)

    def pooled(self, input_ids=None, attention_mask=None, **inputs) -> torch.Tensor:
        """(B, d) sentence embedding of a batch (the backbone's own inputs pass through)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        if self.pooling == "pooler":
            return outputs.pooler_output
        return pool(outputs.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        kwargs.pop("return_dict", None)  # peft passes these through; the output is always one
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_hidden_states", None)
        pooled = self.pooled(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        head = self.classifier
        loss = None
        if self.config.num_labels == 1:
            standardized = head.standardized(pooled)
            logits = standardized * head.target_std + head.target_mean
            if labels is not None:
                target = (labels.to(standardized.dtype) - head.target_mean) / head.target_std
                loss = nn.functional.mse_loss(standardized.squeeze(-1), target.view(-1))
        else:
            logits = head(pooled)
            if labels is not None:
                loss = nn.functional.cross_entropy(logits, labels.view(-1).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_classifier(
    model_path: str,
    num_labels: int,
    *,
    pooling: str = "auto",
    targets: TargetStats | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> PooledClassifier:
    """The backbone of ``model_path`` (``AutoModel``) under a fresh head, in eval mode;
    ``pooling="auto"`` reads it with :func:`read_pooling`; ``device`` / ``dtype`` as in
    :func:`senslora.models.load_model`. Seed torch first for a reproducible head."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from senslora.models import loading_errors, resolve_device, resolve_dtype

    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if pooling == "auto":
        pooling = read_pooling(model_path)
    check_pooling(pooling)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # unused pooler weights (non-pooler poolings) are expected
    hf_logging.disable_progress_bar()
    try:
        with loading_errors(model_path):
            backbone = AutoModel.from_pretrained(model_path, dtype=torch_dtype)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    model = PooledClassifier(backbone, num_labels, pooling, targets=targets)
    return model.to(torch_device).eval()


def is_head_parameter(name: str) -> bool:
    """A parameter of the task head (``classifier`` / ``score``, or peft's trained copy of
    one), as opposed to adapter or hypernetwork parameters."""
    parts = name.split(".")
    return HEAD_NAME in parts or "score" in parts or "modules_to_save" in parts


def _no_decay(name: str, module_types: dict[str, type]) -> bool:
    """transformers' rule: biases and normalisation weights get no weight decay."""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    owner_type = module_types.get(owner)
    is_norm = owner_type is not None and (
        issubclass(owner_type, nn.LayerNorm) or "norm" in owner_type.__name__.lower()
    )
    return name.endswith("bias") or is_norm


def optimizer_groups(
    model: nn.Module, lr: float, head_lr: float, weight_decay: float
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: head vs the rest (adapters, and any
    hypernetwork), each split into weight decay / none. Empty groups are left out."""
    for label, value in (("lr", lr), ("head_lr", head_lr)):
        if not value > 0:
            raise ValueError(f"{label} must be > 0, got {value}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    module_types = {name: type(module) for name, module in model.named_modules()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            key = (is_head_parameter(name), _no_decay(name, module_types))
            groups.setdefault(key, []).append(parameter)
    return [
        {
            "params": params,
            "lr": head_lr if head else lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (head, no_decay), params in sorted(groups.items())
    ]
