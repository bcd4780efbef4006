"""Benchmark 4: how allocation time and statistics memory scale with data and model size.

    .venv/bin/python benchmarks/scaling.py [--quick] [--device cuda --dtype bfloat16]

1. Calibration set size: MiniLM, 8 -> 512 Wikipedia sequences (max length 128). Time of
   ``collect_statistics`` + ``allocate_ranks`` per size, sizes interleaved round by round; a
   least-squares fit time = a + b * tokens with its R^2 and log-log slope (1 = linear), and the
   bytes of the statistics. Sequences have a fixed maximum length, so attention's quadratic cost
   in the length does not grow with the set.
2. Model size: random Llama models of growing width and depth (SmolLM2's proportions), MiniLM and
   SmolLM2-135M, on the same 16 sequences. The bytes held by the ``ModuleStats`` tensors of the
   default estimator, against 4 * sum(d_in) (what it should hold), 4 * sum(d_in * d_out) (the
   number of weights: what the fisher/hutchinson estimators hold) and 4 * sum(d_in^2)
   (``keep_gram``).
"""

from __future__ import annotations

import gc

import torch
from common import (
    calibration,
    describe_batches,
    environment,
    interleaved,
    linear_fit,
    load_benchmark_model,
    parse_args,
    statistics_bytes,
    summarize,
    tiny_llama,
    warmup_slice,
    write_results,
)

import senslora
from senslora.estimators.activation import regroup_by_length
from senslora.targets import find_target_modules, layer_shape

AVG_RANK = 4
FULL = {
    "data": {
        "model": "minilm",
        "sequences": [8, 16, 32, 64, 128, 256, 512],
        "length": 128,
        "batch": 8,
    },
    "data_repeats": 1,
    "models": {
        "sequences": 16,
        "length": 128,
        "llama_shapes": [(96, 4), (192, 4), (384, 4), (768, 4), (192, 2), (192, 8), (192, 16)],
        "real": ["minilm", "smollm2"],
    },
}
QUICK = {
    "data": {"model": "tiny-bert", "sequences": [2, 4, 8], "length": 16, "batch": 2},
    "data_repeats": 1,
    "models": {
        "sequences": 4,
        "length": 16,
        "llama_shapes": [(32, 2), (64, 2)],
        "real": [],
    },
}


def allocate(model, args, last: dict | None = None, key=None):
    """collect_statistics + allocate_ranks; the statistics of the last call go to last[key]."""

    def run(batches):
        stats = senslora.collect_statistics(model, batches, autocast_dtype=args.autocast_dtype)
        if last is not None:
            last[key] = stats
        config = senslora.AllocationConfig(avg_rank=AVG_RANK, budget="rank")  # as committed
        return senslora.allocate_ranks(stats, config)

    return run


def data_scaling(sizes: dict, repeats: int, args) -> dict:
    model, tokenizer = load_benchmark_model(sizes["model"], args.device)
    batches = calibration(tokenizer, max(sizes["sequences"]), sizes["length"], sizes["batch"])
    methods, sets, last = {}, {}, {}
    for count in sizes["sequences"]:
        subset = batches[: count // sizes["batch"]]  # the first `count` sequences
        sets[count] = subset
        run = allocate(model, args, last, count)
        methods[f"senslora_{count}"] = lambda _, s=subset, run=run: run(s)
    print(f"{sizes['model']}: calibration sets of {sizes['sequences']} sequences")
    times = interleaved(methods, None, warmup_slice(batches), args.device, repeats, log=None)
    summary = summarize(times, baseline=f"senslora_{sizes['sequences'][0]}")
    rows = []
    for count, subset in sets.items():
        described = describe_batches(subset)
        computed = describe_batches(list(regroup_by_length(subset)))["padded_tokens"]
        seconds = summary[f"senslora_{count}"]["wall"]["median_s"]
        rows.append(
            {
                **described,
                "computed_tokens": computed,
                "senslora_s": seconds,
                "senslora_cpu_s": summary[f"senslora_{count}"]["cpu"]["median_s"],
                "microseconds_per_real_token": seconds / described["real_tokens"] * 1e6,
                "statistics_bytes": statistics_bytes(last[count]),
            }
        )
        print(
            f"  {count:4d} sequences, {described['real_tokens']:6d} tokens "
            f"({computed} computed): {seconds:.3f}s, statistics {rows[-1]['statistics_bytes']:,} B"
        )
    fit = linear_fit([r["real_tokens"] for r in rows], [r["senslora_s"] for r in rows])
    print(
        f"  time = {fit['intercept']:.3f} s + {fit['slope'] * 1e6:.1f} us x token "
        f"(R^2 {fit['r2']:.4f}, log-log slope {fit['loglog_slope']:.3f})"
    )
    return {
        "model": sizes["model"],
        "max_length": sizes["length"],
        "repeats": repeats,
        "rows": rows,
        "fit_seconds_vs_real_tokens": fit,
        "fit_seconds_vs_computed_tokens": linear_fit(
            [r["computed_tokens"] for r in rows], [r["senslora_s"] for r in rows]
        ),
        "statistics_bytes_constant": len({r["statistics_bytes"] for r in rows}) == 1,
    }


def geometry(model) -> dict[str, int]:
    shapes = [layer_shape(m) for m in find_target_modules(model).values()]
    return {
        "matrices": len(shapes),
        "sum_d_in": sum(s.in_features for s in shapes),
        "weights": sum(s.in_features * s.out_features for s in shapes),
        "sum_d_in_squared": sum(s.in_features**2 for s in shapes),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def model_scaling(sizes: dict, args) -> list[dict]:
    from senslora.models import builtin_model_path, load_tokenizer

    llama_tokenizer = load_tokenizer(str(builtin_model_path("smollm2")))
    llama_batches = calibration(llama_tokenizer, sizes["sequences"], sizes["length"])
    specs = [("llama", shape) for shape in sizes["llama_shapes"]] + [
        (name, None) for name in sizes["real"]
    ]
    rows = []
    for kind, shape in specs:
        if kind == "llama":
            hidden, layers = shape
            model = tiny_llama(len(llama_tokenizer), hidden, layers).to(args.device).eval()
            batches, label = llama_batches, f"llama-h{hidden}-l{layers}"
        else:
            model, tokenizer = load_benchmark_model(kind, args.device)
            batches, label = calibration(tokenizer, sizes["sequences"], sizes["length"]), kind
        last = {}
        run = allocate(model, args, last, "stats")
        times = interleaved({"senslora": run}, batches, warmup_slice(batches), args.device, 1, None)
        stats = last.pop("stats")
        measured = statistics_bytes(stats)
        shapes = geometry(model)
        row = {
            "model": label,
            **shapes,
            **describe_batches(batches),
            "senslora_s": times["senslora"][0],
            "statistics_bytes": measured,
            "expected_bytes_4_sum_d_in": 4 * shapes["sum_d_in"],
            "equals_4_sum_d_in": measured == 4 * shapes["sum_d_in"],
            "full_diagonal_bytes_4_weights": 4 * shapes["weights"],
            "keep_gram_bytes_4_sum_d_in_squared": 4 * shapes["sum_d_in_squared"],
        }
        rows.append(row)
        print(
            f"  {label}: {shapes['weights']:,} weights in {shapes['matrices']} matrices, "
            f"statistics {measured:,} B (4 x sum d_in = {4 * shapes['sum_d_in']:,}; a full "
            f"diagonal: {4 * shapes['weights']:,}), {row['senslora_s']:.2f}s"
        )
        del model, stats, run
        gc.collect()
    return rows


def main() -> None:
    args = parse_args("scaling", __doc__.splitlines()[0])
    torch.manual_seed(0)
    sizes = QUICK if args.quick else FULL
    data = data_scaling(sizes["data"], sizes["data_repeats"] * args.repeat_factor, args)
    print("model sizes:")
    models = model_scaling(sizes["models"], args)
    payload = {
        "benchmark": "scaling",
        "environment": environment(args.device),
        "config": {
            "quick": args.quick,
            "repeat_factor": args.repeat_factor,
            "dtype": args.dtype,
            "avg_rank": AVG_RANK,
            "sizes": sizes,
        },
        "calibration_size": data,
        "model_size": {
            "rows": models,
            "statistics_bytes_equal_4_sum_d_in": all(r["equals_4_sum_d_in"] for r in models),
            "bytes_fit_vs_sum_d_in": linear_fit(
                [r["sum_d_in"] for r in models], [r["statistics_bytes"] for r in models]
            ),
        },
    }
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
