"""Loading models and tokenizers for the CLI: hub ids or local folders, on a chosen device/dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    resolve_dtype(dtype), resolve_device(device)  # argument errors before any loading
    _check_model_path(model_path)
    with loading_errors(model_path):
        return _load_model(model_path, task, device, dtype, num_labels, device_map)


def _load_model(model_path, task, device, dtype, num_labels, device_map) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
    with loading_errors(model_path, what="tokenizer"):
        return AutoTokenizer.from_pretrained(model_path)


@contextlib.contextmanager
def loading_errors(model_path: str, what: str = "model") -> Iterator[None]:
    """Turn what transformers raises for an unreadable, incomplete or corrupted model folder (or
    an unreachable hub id) into one ValueError line that names the path."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the {what} {model_path}: {_first_line(error)}") from error
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors' own exception type
            raise
        raise ValueError(
            f"could not load the {what} {model_path}: corrupted or truncated weights "
            f"({_first_line(error)})"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


BUILTIN_MODELS = ("minilm", "smollm2")


def cache_dir() -> Path:
    """Where converted models live: ``$SENSLORA_CACHE`` or ``~/.cache/senslora``."""
    import os

    return Path(os.environ.get("SENSLORA_CACHE", Path.home() / ".cache" / "senslora"))


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain Hugging Face folder (float32 safetensors).

    transformers reads GGUF with ``gguf_file=``; the result still carries a ``quantization_config``
    that peft and save/reload do not expect, so it is dropped. The folder appears atomically.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        Path(tmp).rename(out_dir)
    out_dir.chmod(0o755)  # TemporaryDirectory is private (0700); the cache is not
    return out_dir


def builtin_model_path(name: str) -> Path:
    """The shipped models: ``minilm`` (BERT encoder folder) and ``smollm2`` (SmolLM2-135M-Instruct,
    converted once from the shipped GGUF into the cache)."""
    from senslora.data.assets import minilm_path, smollm2_gguf_path

    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        folder = cache_dir() / "smollm2-135m-instruct"
        if not (folder / "config.json").is_file():
            convert_gguf(smollm2_gguf_path(), folder)
        return folder
    raise ValueError(f"built-in models are {BUILTIN_MODELS}, got {name!r}")


def resolve_model_path(model: str | None) -> str:
    """``None`` -> the shipped MiniLM; a built-in name -> its folder; anything else unchanged."""
    if model is None:
        return str(builtin_model_path("minilm"))
    if model in BUILTIN_MODELS and not Path(model).exists():
        return str(builtin_model_path(model))
    return model
