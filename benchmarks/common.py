"""What every benchmark shares: arguments, models, calibration batches, timing, JSON results.

Benchmarks are not tests: they are seeded, warm up, time every compared method in the same run,
interleaved repeat by repeat (the order rotates so that no method always runs first), and report
medians, minimums and ratios. On CUDA every timed call is bracketed by
``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_MODELS = {"minilm": "tiny-bert", "smollm2": "tiny-llama"}
RANDOM_WEIGHTS_VARIABLE = "SENSLORA_BENCH_RANDOM_WEIGHTS"


def random_weights() -> bool:
    """Whether ``--random-weights`` is in force (in this process or the one that started it)."""
    return os.environ.get(RANDOM_WEIGHTS_VARIABLE) == "1"


def parse_args(name: str, description: str, add_arguments: Callable | None = None):
    """Arguments every benchmark takes: --quick, --device, --dtype, --threads, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny random models of the same architectures and tiny sizes: a smoke run in seconds",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="compute dtype of the forward passes (autocast; weights and accumulation stay "
        "float32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine one thread gives stable ratios; "
        "0 = torch's default, all cores)",
    )
    parser.add_argument(
        "--models",
        default="minilm,smollm2",
        help="comma-separated subset of minilm,smollm2 (tiny stand-ins with --quick)",
    )
    parser.add_argument(
        "--repeat-factor",
        type=int,
        default=1,
        help="multiply the repeats and timed steps (e.g. 10 on a GPU, where they are cheap)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build minilm/smollm2 from their config.json with random weights (same architecture, "
        "shapes and cost; for a machine without the weight files); recorded in the results",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results JSON (default results/{name}.json)"
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS_DIR / (f"{name}-quick.json" if args.quick else f"{name}.json")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or not set(args.models) <= set(QUICK_MODELS):
        parser.error(f"--models takes names among {sorted(QUICK_MODELS)}, got {args.models}")
    if args.repeat_factor < 1:
        parser.error(f"--repeat-factor must be at least 1, got {args.repeat_factor}")
    if args.random_weights:  # an environment variable, so that worker processes inherit it
        os.environ[RANDOM_WEIGHTS_VARIABLE] = "1"
    args.device = resolve_device(args.device)
    args.autocast_dtype = DTYPES[args.dtype]
    return args


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    return resolved


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the figures were measured."""
    import peft
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": _device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": _git_commit(_senslora_folder()),  # of the senslora source measured
        "benchmarks_commit": _git_commit(Path(__file__).resolve().parent),
        "random_weights": random_weights(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _senslora_folder() -> Path:
    """Where the imported senslora comes from (e.g. an older checkout on PYTHONPATH, to measure
    the code before a change with today's benchmark)."""
    import senslora

    return Path(senslora.__file__).resolve().parent


def _git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=folder,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def write_results(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "load_average_at_end": list(os.getloadavg())}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype | torch.device | Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Models and data


def load_benchmark_model(name: str, device: torch.device):
    """(model, tokenizer) in float32 on ``device``, in eval mode.

    ``minilm`` and ``smollm2`` are the shipped models; ``tiny-bert`` and ``tiny-llama`` are random
    models of the same architectures (2 layers, width 32) with the real tokenizers, for --quick.
    """
    from senslora.models import builtin_model_path, load_model, load_tokenizer

    if name in ("minilm", "smollm2"):
        path = str(builtin_model_path(name))
        if random_weights():
            return _random_model(path, device), load_tokenizer(path)
        return load_model(path, device=str(device)), load_tokenizer(path)
    if name == "tiny-bert":
        tokenizer = load_tokenizer(str(builtin_model_path("minilm")))
        return tiny_bert(len(tokenizer)).to(device).eval(), tokenizer
    if name == "tiny-llama":
        tokenizer = load_tokenizer(str(builtin_model_path("smollm2")))
        return tiny_llama(len(tokenizer)).to(device).eval(), tokenizer
    raise ValueError(f"unknown benchmark model {name!r}")


def _random_model(path: str, device: torch.device):
    """The model of ``path``'s config.json with random weights (seed 0), float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from senslora.models import infer_task

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path)
    if infer_task(path) == "causal-lm":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    return model.to(device).eval()


def tiny_bert(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random Llama with SmolLM2's proportions: intermediate 8/3 x hidden, 3:1 grouped KV,
    tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = hidden // (16 if hidden < 128 else 64)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=(8 * hidden) // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 3 if heads % 3 == 0 else heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def calibration(tokenizer, num_samples: int, seq_len: int, batch_size: int = 8, seed: int = 0):
    """Wikipedia calibration batches (the built-in default source), on the CPU."""
    from senslora.data import CalibrationConfig, calibration_batches

    config = CalibrationConfig(
        source="wikipedia",
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
    )
    return calibration_batches(tokenizer, config)


def describe_batches(batches) -> dict[str, int]:
    return {
        "sequences": sum(int(b["input_ids"].shape[0]) for b in batches),
        "batches": len(batches),
        "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "padded_tokens": sum(int(b["input_ids"].numel()) for b in batches),
    }


def warmup_slice(batches, rows: int = 2, columns: int = 16):
    """A tiny batch cut from the first one, to warm a method up without paying a full pass."""
    first = batches[0]
    return [{k: v[:rows, :columns] if v.dim() == 2 else v[:rows] for k, v in first.items()}]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def plain_forward(model, batches, device: torch.device, dtype: torch.dtype | None) -> None:
    """The reference: one inference-mode forward pass over the batches, moved to ``device``."""
    from senslora.batches import to_device

    with torch.inference_mode(), autocast(device, dtype):
        for batch in batches:
            model(**to_device(batch, device))


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of ``fn()``, the device drained before and after.

    On a shared CPU the CPU time leaves out the time the process waited for a core; on CUDA
    only the wall-clock time means anything."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


class Samples(dict):
    """``{method: [seconds per call]}`` (wall clock), with ``.cpu``: the same in CPU seconds."""

    def __init__(self, names):
        super().__init__((name, []) for name in names)
        self.cpu = {name: [] for name in names}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self[name].append(wall)
        self.cpu[name].append(cpu)


def interleaved(
    methods: Mapping[str, Callable[[Any], Any]],
    data: Any,
    warmup_data: Any,
    device: torch.device,
    repeats: int,
    log: Callable[[str], None] | None = print,
) -> Samples:
    """Seconds per call ``method(data)`` of every method: one warm-up call each on
    ``warmup_data`` (e.g. one batch; None: no warm-up), then ``repeats`` rounds of one call
    each, the order rotating from round to round."""
    names = list(methods)
    if warmup_data is not None:
        for name in names:
            methods[name](warmup_data)
    samples = Samples(names)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples.add(name, *timed(lambda: methods[name](data), device))  # noqa: B023
        if log is not None:
            log(
                f"  round {round_ + 1}/{repeats}: "
                + ", ".join(f"{n} {samples[n][-1]:.3f}s" for n in names)
            )
    return samples


def summarize(samples: Samples, baseline: str) -> dict[str, Any]:
    """Per method, wall clock and CPU time: median, minimum and three ratios to ``baseline``:
    the median of the per-round ratios (paired: the two calls ran next to each other; the
    headline), the ratio of the medians and the ratio of the minimums (the least disturbed
    calls). The spread of the per-round ratios is given as their minimum and maximum."""
    out: dict[str, Any] = {}
    for name in samples:
        out[name] = {
            "wall": _summary(samples[name], samples[baseline]),
            "cpu": _summary(samples.cpu[name], samples.cpu[baseline]),
        }
    return out


def _summary(values: list[float], base: list[float]) -> dict[str, Any]:
    paired = [v / b for v, b in zip(values, base, strict=True)]
    return {
        "seconds": values,
        "median_s": statistics.median(values),
        "min_s": min(values),
        "ratio_paired_median": statistics.median(paired),
        "ratio_paired_range": [min(paired), max(paired)],
        "ratio_of_medians": statistics.median(values) / statistics.median(base),
        "ratio_of_minimums": min(values) / min(base),
    }


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b·x, with R² and the log-log slope (1 for linear growth)."""
    import math

    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mlx, mly = sum(lx) / n, sum(ly) / n
    loglog = sum((a - mlx) * (b - mly) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mlx) ** 2 for a in lx
    )
    return {
        "intercept": intercept,
        "slope": slope,
        "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
        "loglog_slope": loglog,
    }


def head_share(model) -> dict[str, float | int] | None:
    """Multiply-accumulates per token of the output head vs all linear layers (analytic)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(head, torch.nn.Linear):
        return None
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {
        "head_shape": list(head.weight.shape),
        "head_weights": head.weight.numel(),
        "all_linear_weights": linear,
        "head_share_of_linear_macs": head.weight.numel() / linear,
    }


def statistics_bytes(stats) -> int:
    """Bytes held by the tensors of a ``{name: ModuleStats}``."""
    total = 0
    for s in stats.values():
        for tensor in (s.column_values, s.diagonal, s.gram):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
