"""Where the activation trace of a decoder's ``down_proj`` comes from, and what each token-filter
option does to the allocation.

For every model: one hooked forward pass over the calibration set records, per ``down_proj``,
the share of its trace (Σ_t Σ_j x_tj²) held by the first token of each sequence, by the tokens
that the ``outlier_factor`` rule drops, by its largest input channel, and the tokens (by id)
that hold the most of it away from the first position; the residual stream's token norms tell
which positions carry massive activations. Then the calibration is allocated (average rank 8,
the setting of docs/results.md) under each option: the default activation statistics,
``skip_positions=1``, ``outlier_factor``, and the Fisher estimator with the next-token loss,
and each allocation is compared with the default (ranks of the top matrices, share of the
budget, Spearman correlation of the ranks).

    python benchmarks/decoder_diagnosis.py                 # SmolLM2 (+ Gemma 3 with --gemma DIR)
    python benchmarks/decoder_diagnosis.py --quick         # tiny random Llama, seconds

Writes results/decoder_diagnosis.json and docs/img/decoder-massive-activations.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, load_benchmark_model, write_results

from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.compare import spearman
from senslora.data.calibration import CalibrationConfig, calibration_batches
from senslora.estimators.token_filters import drop_outlier_rows
from senslora.targets import find_target_modules

FIGURE = Path(__file__).resolve().parent.parent / "docs" / "img" / "decoder-massive-activations.png"
OUTLIER_FACTOR = 10.0
"""Fixed before any allocation was looked at: a token whose input norm is 10x the median of its
batch is far outside the spread of ordinary tokens (the JSON records the 99th percentile of the
norm ratio of the tokens kept, to check this)."""
AVG_RANK = 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, tiny sizes")
    parser.add_argument("--gemma", type=Path, default=None, help="converted Gemma-3-270M folder")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.seq_len = 8, 32
    suffix = "-quick" if args.quick else ""
    args.out = args.out or RESULTS_DIR / f"decoder_diagnosis{suffix}.json"
    args.figure = args.figure or (args.out.with_suffix(".png") if args.quick else FIGURE)
    torch.set_num_threads(args.threads)
    return args


def load(name: str, gemma: Path | None):
    if name == "gemma3-270m":
        from senslora.models import load_model, load_tokenizer

        return load_model(str(gemma)), load_tokenizer(str(gemma))
    return load_benchmark_model(name, torch.device("cpu"))


class TraceTally:
    """Per down_proj: the trace, and the parts of it held by first tokens, outliers, channels."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.total = self.first = self.outlier = 0.0
        self.channels: torch.Tensor | None = None
        self.by_token = torch.zeros(vocab, dtype=torch.float64)  # energy away from position 0
        self.norm_ratios: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> None:
        x = x.float()
        energy = x.square().sum(-1)  # (B, T): each token's Σ_j x_tj²
        first = mask & (mask.long().cumsum(1) == 1)
        rows = x[mask]  # (real tokens, d_in)
        channels = rows.square().sum(0).double()
        self.channels = channels if self.channels is None else self.channels + channels
        self.total += float(energy[mask].sum())
        self.first += float(energy[first].sum())
        kept = drop_outlier_rows(rows, OUTLIER_FACTOR)
        self.outlier += float(energy[mask].sum() - kept.square().sum())
        norms = rows.norm(dim=1)
        self.norm_ratios.append((norms / norms.median()).clamp_max(1e6))
        later = mask & ~first
        self.by_token.index_add_(0, ids[later], energy[later].double())

    def summary(self, decode) -> dict:
        ratios = torch.cat(self.norm_ratios)
        ordinary = ratios[ratios <= OUTLIER_FACTOR]
        top = torch.topk(self.by_token, 5)
        return {
            "first_token_share": self.first / self.total,
            "outlier_token_share": self.outlier / self.total,
            "top_channel": int(self.channels.argmax()),
            "top_channel_share": float(self.channels.max() / self.channels.sum()),
            "norm_ratio_p99_of_kept_tokens": float(torch.quantile(ordinary, 0.99)),
            "max_norm_ratio": float(ratios.max()),
            "top_later_tokens": [
                {"token": decode(int(i)), "share": float(v) / self.total}
                for v, i in zip(top.values, top.indices, strict=True)
            ],
        }


def diagnose(model, tokenizer, batches) -> dict:
    """The trace tallies of every down_proj and the residual stream's token norms."""
    modules = {n: m for n, m in find_target_modules(model).items() if n.endswith("down_proj")}
    tallies = {n: TraceTally(model.config.vocab_size) for n in modules}
    current = {}

    def hook(name):
        return lambda _m, inputs, _o: tallies[name].add(inputs[0], *current["batch"])

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    first_ratio, positions = [], Counter()
    try:
        with torch.inference_mode():
            for batch in batches:
                mask = batch["attention_mask"].bool()
                current["batch"] = (mask, batch["input_ids"])
                base = getattr(model, "model", model)  # no vocabulary head: no logits
                out = base(**batch, output_hidden_states=True)
                norms = out.hidden_states[len(out.hidden_states) // 2].norm(dim=-1)  # (B, T)
                median = norms[mask].median()
                first_ratio.append(float(norms[:, 0].mean() / median))
                big = (norms > OUTLIER_FACTOR * median) & mask
                positions.update(big.nonzero()[:, 1].tolist())
    finally:
        for handle in handles:
            handle.remove()
    decode = lambda i: tokenizer.decode([i])  # noqa: E731
    return {
        "down_proj": {n: t.summary(decode) for n, t in tallies.items()},
        "middle_layer_first_token_norm_over_median": sum(first_ratio) / len(first_ratio),
        "middle_layer_outlier_positions": dict(sorted(positions.items())[:10]),
    }


OPTIONS = {
    "default": {},
    "skip_positions=1": {"skip_positions": 1},
    f"outlier_factor={OUTLIER_FACTOR:g}": {"outlier_factor": OUTLIER_FACTOR},
    "fisher (next-token loss)": {"estimator": "fisher", "per_sample": False},
}


BUDGETS = ("rank", "parameters")
"""Every option is allocated under both budgets from the same statistics: 'rank' (the paper's,
the setting of the first committed run) and 'parameters' (the default since the equal-parameter
study: at most uniform LoRA r = 8's parameter count)."""


def allocations(model, batches) -> dict[str, dict]:
    """``{budget: {option: its allocation, compared with the default option's}}``."""
    out: dict[str, dict] = {budget: {} for budget in BUDGETS}
    defaults: dict[str, dict] = {}
    for label, options in OPTIONS.items():
        start = time.perf_counter()
        stats = collect_statistics(model, batches, **options)
        seconds = time.perf_counter() - start
        print(f"  {label}: {seconds:.0f} s", flush=True)
        for budget in BUDGETS:
            config = AllocationConfig(avg_rank=AVG_RANK, budget=budget)
            allocation = allocate_ranks(stats, config)
            trace = allocate_ranks(stats, dataclasses.replace(config, score="global"))
            defaults.setdefault(budget, allocation.ranks)
            out[budget][label] = {"seconds": round(seconds, 2)} | summarize(
                allocation, defaults[budget], trace.ranks
            )
    return out


def summarize(allocation, default: dict, trace: dict) -> dict:
    """Top matrices, their share of the ranks and of the adapter parameters, rank-1 count, and
    the Spearman correlation of the ranks with the default option's and the trace score's."""
    ranks = allocation.ranks
    largest = sorted(ranks.items(), key=lambda item: item[1], reverse=True)
    cost = {name: sum(allocation.shapes[name]) for name in ranks}
    return {
        "top_ranks": dict(largest[:5]),
        "top3_share": sum(r for _, r in largest[:3]) / allocation.total_rank,
        "top3_parameter_share": sum(r * cost[n] for n, r in largest[:3])
        / allocation.num_parameters,
        "parameters": allocation.num_parameters,
        "uniform_parameters": allocation.uniform_parameters(),
        "rank_one_matrices": sum(1 for r in ranks.values() if r == 1),
        "spearman_to_default": spearman(list(default.values()), list(ranks.values())),
        "spearman_combined_to_trace_score": spearman(list(ranks.values()), list(trace.values())),
        "ranks": ranks,
    }


def main() -> None:
    args = parse_args()
    names = ["tiny-llama"] if args.quick else ["smollm2"]
    if args.gemma is not None and not args.quick:
        names.append("gemma3-270m")
    calibration = CalibrationConfig(
        num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size
    )
    results = {}
    for name in names:
        model, tokenizer = load(name, args.gemma)
        batches = calibration_batches(tokenizer, calibration)
        print(f"{name}: diagnosing", flush=True)
        by_budget = allocations(model, batches)
        results[name] = {
            "diagnosis": diagnose(model, tokenizer, batches),
            "allocations": by_budget["rank"],  # the key of the first committed run
            "allocations_parameters": by_budget["parameters"],
        }
        for budget, options in by_budget.items():
            print(name, budget, {k: round(v["top3_share"], 2) for k, v in options.items()})
    plot(results, args.figure)
    write_results(
        args.out,
        {
            "benchmark": "decoder_diagnosis",
            "config": {
                "quick": args.quick,
                "calibration": dataclasses.asdict(calibration),
                "avg_rank": AVG_RANK,
                "outlier_factor": OUTLIER_FACTOR,
                "figure": _relative(args.figure),
            },
            "environment": environment(torch.device("cpu")),
            "models": results,
        },
    )


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine-specific prefix)."""
    root = Path(__file__).resolve().parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def plot(results: dict, path: Path) -> None:
    """Per model: the share of each down_proj trace held by first tokens and by the top channel
    (top), and the rank of each down_proj under every option (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 6.5), squeeze=False)
    for column, (name, result) in enumerate(results.items()):
        rows = result["diagnosis"]["down_proj"]
        layers = range(len(rows))
        top, bottom = axes[0][column], axes[1][column]
        for key, label in (
            ("first_token_share", "first token"),
            ("outlier_token_share", f"tokens > {OUTLIER_FACTOR:g}x median norm"),
            ("top_channel_share", "largest input channel"),
        ):
            top.plot(layers, [r[key] for r in rows.values()], marker="o", ms=3, label=label)
        top.set(title=f"{name}: share of each down_proj trace", xlabel="layer", ylim=(0, 1.02))
        top.legend(fontsize=8)
        for label, allocation in result["allocations_parameters"].items():
            ranks = [allocation["ranks"][n] for n in rows]
            bottom.semilogy(layers, ranks, marker="o", ms=3, label=label)
        title = f"down_proj ranks (average rank {AVG_RANK}, parameter budget)"
        bottom.set(title=title, xlabel="layer")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
