"""Loading models and tokenizers for the CLI: hub ids or local folders, on a chosen device/dtype."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TASKS = ("auto", "causal-lm", "sequence-classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def infer_task(model_path: str) -> str:
    """``causal-lm`` for decoder architectures (``*ForCausalLM``, ``*LMHeadModel``), else
    ``sequence-classification`` (encoders are fine-tuned with a classification head)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    return "sequence-classification"


def load_model(
    model_path: str,
    *,
    task: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    num_labels: int = 2,
    device_map: str | None = None,
) -> nn.Module:
    """A transformers model from a hub id or a local folder.

    Encoders load as ``AutoModelForSequenceClassification`` so that module names
    (``bert.encoder.layer.0...``) are the ones the fine-tuned model will have.
    ``device_map="auto"`` spreads a model that does not fit one device (accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    _check_model_path(model_path)
    task = infer_task(model_path) if task == "auto" else task
    kwargs = {"dtype": resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new classifier head is expected to be untrained
    hf_logging.disable_progress_bar()
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=num_labels, **kwargs
            )
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    if device_map is None:
        model.to(resolve_device(device))
    return model.eval()


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    _check_model_path(model_path)
    return AutoTokenizer.from_pretrained(model_path)


def _check_model_path(model_path: str) -> None:
    """A local folder must hold a config.json; a name that is neither an existing path nor shaped
    like a hub id (``name`` or ``org/name``) is a user error, not a hub request."""
    path = Path(model_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return
    if model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise FileNotFoundError(f"model path {model_path} does not exist")
