"""The paper's scale: an allocation on an 8B-shaped Llama against the paper's 25.78 s.

    python benchmarks/paper_scale.py --device cuda          # LLaMA3.1-8B's shapes, bf16 on the GPU
    .venv/bin/python benchmarks/paper_scale.py --quick      # a tiny Llama, a smoke run on the CPU

The paper reports 25.78 s for calibration + metrics + rank allocation on LLaMA3.1-8B with PIQA
(4 x A100). Here the model has LLaMA3.1-8B's configuration (32 layers, hidden 4,096,
intermediate 14,336, 32 query and 8 key/value heads, vocabulary 128,256) with random weights
created on the device in ``--weights-dtype`` (bfloat16 by default on CUDA), so that nothing large
has to be downloaded or sent. The calibration set is 128 sequences of 512 random tokens, in
batches of ``--batch-size``; the costs measured do not depend on the token values.

Two methods run interleaved, round by round, on the same batches:

- ``forward``: a plain ``torch.inference_mode()`` forward pass of the model over the batches, with
  its ``lm_head`` (what "one forward pass" means to a user);
- ``senslora``: ``collect_statistics`` (activation estimator, the paper's statistics) +
  ``allocate_ranks`` (the library's defaults): everything a user runs before training.

Goals (issue 16): the whole allocation under 5 s on one GPU, and senslora / forward <= 1.10.
Peak device memory of each method is measured on one extra call after the timed rounds.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import (
    DTYPES,
    environment,
    head_share,
    interleaved,
    parse_args,
    plain_forward,
    statistics_bytes,
    summarize,
    synchronize,
    write_results,
)

import senslora

TARGET_RATIO = 1.10
TARGET_SECONDS = 5.0
PAPER_SECONDS = 25.78  # LLaMA3.1-8B, PIQA, 4 x A100 (the paper's Section 5)
# LLaMA3.1-8B's config.json (the fields that set the cost of a forward pass)
LLAMA31_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# the same family, tiny: 4:1 grouped KV, 3.5 x intermediate, untied head
QUICK_CONFIG = {
    **LLAMA31_8B,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
}
FULL = {"sequences": 128, "seq_len": 512, "repeats": 3}
QUICK = {"sequences": 8, "seq_len": 32, "repeats": 2}


def build_model(config_fields: dict, device: torch.device, dtype: torch.dtype):
    """A random LlamaForCausalLM of ``config_fields``, created directly on ``device`` in ``dtype``
    (seed 0), in eval mode, with PyTorch's scaled-dot-product attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**config_fields, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_batches(vocab_size: int, sequences: int, seq_len: int, batch_size: int, seed: int = 0):
    """``sequences`` full-length sequences of random token ids (seeded), on the CPU, in batches."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (sequences, seq_len), generator=generator)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in ids.split(batch_size)
    ]


def forward_fn(model, device: torch.device):
    """One inference-mode forward pass over the batches in the weights' dtype (no autocast)."""
    return lambda batches: plain_forward(model, batches, device, None)


def allocation_fn(model, device: torch.device, phases: list | None = None):
    """Statistics + metrics + ranks with the library's defaults (activation statistics, the
    paper's; the weights' own dtype, no autocast). ``phases`` receives (statistics seconds,
    metrics + ranks seconds) of every call."""
    config = senslora.AllocationConfig()

    def run(batches):
        start = time.perf_counter()
        stats = senslora.collect_statistics(model, batches, estimator="activation")
        synchronize(device)
        middle = time.perf_counter()
        allocation = senslora.allocate_ranks(stats, config)
        if phases is not None:
            phases.append((middle - start, time.perf_counter() - middle))
        run.last_stats_bytes = statistics_bytes(stats)
        return allocation

    return run


def peak_memory(fn, batches, device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device during ``fn(batches)`` (None elsewhere)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn(batches)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _add_arguments(parser) -> None:
    parser.add_argument(
        "--weights-dtype",
        default=None,
        choices=sorted(DTYPES),
        help="dtype the random weights are created in (default: bfloat16 on CUDA, float32 on "
        "the CPU); the forward passes run in it, without autocast",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="sequences per calibration batch (default 8)"
    )


def main() -> None:
    args = parse_args("paper_scale", __doc__.splitlines()[0], _add_arguments)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be at least 1, got {args.batch_size}")
    weights_dtype = args.weights_dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    dtype = DTYPES[weights_dtype] or torch.float32
    fields = QUICK_CONFIG if args.quick else LLAMA31_8B
    sizes = dict(QUICK if args.quick else FULL)
    sizes["repeats"] *= args.repeat_factor

    start = time.perf_counter()
    model = build_model(fields, args.device, dtype)
    synchronize(args.device)
    build_seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"model: {parameters / 1e9:.3f} B parameters in {weight_bytes / 2**30:.2f} GiB "
        f"({weights_dtype}), built on {args.device} in {build_seconds:.1f} s"
    )
    batches = random_batches(
        fields["vocab_size"], sizes["sequences"], sizes["seq_len"], args.batch_size
    )
    print(
        f"calibration: {sizes['sequences']} sequences x {sizes['seq_len']} tokens in "
        f"{len(batches)} batches of {args.batch_size}"
    )

    phases: list = []
    methods = {
        "forward": forward_fn(model, args.device),
        "senslora": allocation_fn(model, args.device, phases),
    }
    # warm-up on one full batch: kernels, autotuning and allocator pools at the timed shapes
    times = interleaved(methods, batches, batches[:1], args.device, sizes["repeats"])
    summary = summarize(times, baseline="forward")
    ratio = summary["senslora"]["wall"]["ratio_paired_median"]
    seconds = summary["senslora"]["wall"]["median_s"]
    timed_phases = phases[1:]  # without the warm-up call
    memory = {
        "weights_bytes": weight_bytes,
        "forward_peak_bytes": peak_memory(methods["forward"], batches, args.device),
        "senslora_peak_bytes": peak_memory(methods["senslora"], batches, args.device),
        "statistics_bytes": methods["senslora"].last_stats_bytes,
    }
    payload = {
        "benchmark": "paper_scale",
        "environment": environment(args.device),
        "config": {
            "quick": args.quick,
            "model_config": fields,
            "weights_dtype": weights_dtype,
            "parameters": parameters,
            "build_seconds": build_seconds,
            "batch_size": args.batch_size,
            **sizes,
            "tokens": sizes["sequences"] * sizes["seq_len"],
            "estimator": "activation",
            "allocation_config": "AllocationConfig() (the library's defaults)",
        },
        "timings": summary,
        "phases": {
            "statistics_median_s": _median([p[0] for p in timed_phases]),
            "metrics_and_ranks_median_s": _median([p[1] for p in timed_phases]),
        },
        "head": head_share(model),
        "memory": memory,
        "senslora_seconds": seconds,
        "ratio": ratio,
        "targets": {"seconds": TARGET_SECONDS, "ratio": TARGET_RATIO},
        "met": {"seconds": seconds <= TARGET_SECONDS, "ratio": ratio <= TARGET_RATIO},
        "paper_seconds": PAPER_SECONDS,
    }
    print(
        f"senslora {seconds:.2f} s (goal <= {TARGET_SECONDS} s; the paper: {PAPER_SECONDS} s on 4 "
        f"A100), forward {summary['forward']['wall']['median_s']:.2f} s, senslora / forward = "
        f"{ratio:.3f} (goal <= {TARGET_RATIO})"
    )
    if memory["forward_peak_bytes"] is not None:
        print(
            f"peak memory: forward {memory['forward_peak_bytes'] / 2**30:.2f} GiB, senslora "
            f"{memory['senslora_peak_bytes'] / 2**30:.2f} GiB (weights "
            f"{weight_bytes / 2**30:.2f} GiB)"
        )
    write_results(args.out, payload)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
