"""Benchmark 1: the cost of an allocation relative to one plain forward pass.

    .venv/bin/python benchmarks/allocation_overhead.py [--quick] [--device cuda --dtype bfloat16]

For each model, on the same calibration batches and interleaved round by round:

- ``forward``: a plain ``torch.inference_mode()`` forward pass of the model over the batches
  (with its head: ``lm_head`` for SmolLM2, pooler + classifier for MiniLM);
- ``forward_regrouped``: the same forward pass over the batches the activation estimator actually
  computes (the same sequences regrouped by length, so with less padding);
- ``senslora``: ``collect_statistics`` (activation estimator) + ``allocate_ranks``, i.e.
  calibration, metrics and ranks, everything a user runs before training;
- ``senslora_grouped`` on the CPU, ``senslora_per_input`` elsewhere: the same with the reduction
  of the hooked inputs the device does not use by default (see `collect_activation_statistics`:
  every input reduced on its own on the CPU, the copies of a forward pass reduced together
  elsewhere), to measure what the default buys;
- ``senslora_full_forward`` (SmolLM2): the same without the early stop (the forward runs through
  the head), to show what the early stop saves.

The ratio senslora / forward is the headline (limit 1.0 is "one forward pass"; target <= 1.10);
senslora / forward_regrouped isolates the cost of the hooks, metrics and ranks.
The gradient estimators are timed on a smaller calibration set, again against a plain forward
pass over that set: ``fisher`` (per-sample gradients) and ``hutchinson`` (8 Rademacher probes,
double backward through eager attention).
"""

from __future__ import annotations

import statistics
import time

import torch
from common import (
    QUICK_MODELS,
    RESULTS_DIR,
    calibration,
    describe_batches,
    environment,
    head_share,
    interleaved,
    load_benchmark_model,
    parse_args,
    plain_forward,
    summarize,
    synchronize,
    warmup_slice,
    write_results,
)

import senslora
from senslora.estimators.activation import (
    GROUPED_FLUSH_BYTES,
    collect_activation_statistics,
    default_flush_bytes,
    regroup_by_length,
)
from senslora.targets import find_target_modules

TARGET = 1.10
AVG_RANK = 4
# model -> (sequences, max length, repeats) for the activation estimator; the gradient set
FULL = {
    "minilm": {"activation": (32, 256, 5), "gradient": (4, 128, 2)},
    "smollm2": {"activation": (32, 128, 2), "gradient": (2, 64, 1)},
}
QUICK = {"activation": (8, 32, 2), "gradient": (4, 16, 1)}
# --overhead-bound: 4 batches of one 4-token sequence, so that the arithmetic is negligible and
# the time is that of dispatching operations and running Python, as on a launch-bound GPU
OVERHEAD_BOUND = {"activation": (4, 4, 15), "batch_size": 1}


def allocation_fn(
    model, args, estimator="activation", stop_early=True, flush_bytes=None, phases=None
):
    """Statistics + metrics + ranks on some batches: what the user pays for an allocation.
    ``phases`` (a list) receives (statistics seconds, metrics + ranks seconds) of every call.
    ``stop_early=False`` or a ``flush_bytes`` departs from the defaults of the activation
    estimator (see `collect_activation_statistics`)."""
    config = senslora.AllocationConfig(avg_rank=AVG_RANK, budget="rank")  # as committed

    def run(batches):
        start = time.perf_counter()
        if stop_early and flush_bytes is None:
            stats = senslora.collect_statistics(
                model, batches, estimator=estimator, autocast_dtype=args.autocast_dtype
            )
        else:
            modules = find_target_modules(model)
            stats = collect_activation_statistics(
                model,
                modules,
                batches,
                autocast_dtype=args.autocast_dtype,
                stop_early=stop_early,
                flush_bytes=flush_bytes,
            )
        synchronize(args.device)
        middle = time.perf_counter()
        allocation = senslora.allocate_ranks(stats, config)
        if phases is not None:
            phases.append((middle - start, time.perf_counter() - middle))
        return allocation

    return run


def forward_fn(model, args, regroup=False):
    """A plain forward pass over the batches (``regroup``: over the batches the activation
    estimator computes, i.e. the same sequences regrouped by length)."""
    if regroup:
        return lambda batches: plain_forward(
            model, list(regroup_by_length(batches)), args.device, args.autocast_dtype
        )
    return lambda batches: plain_forward(model, batches, args.device, args.autocast_dtype)


def _paired_ratio(times, method: str, baseline: str) -> float:
    """Median over rounds of ``method`` / ``baseline`` (the same round: the same conditions)."""
    return statistics.median(a / b for a, b in zip(times[method], times[baseline], strict=True))


def _phase_medians(phases) -> dict[str, float]:
    return {
        "statistics_median_s": statistics.median(p[0] for p in phases),
        "metrics_and_ranks_median_s": statistics.median(p[1] for p in phases),
    }


def with_labels(batches, model):
    """Classification models need labels for the gradient estimators: random ones, seeded."""
    if getattr(model.config, "is_decoder", False) or "CausalLM" in type(model).__name__:
        return batches
    generator = torch.Generator().manual_seed(0)
    return [
        {**b, "labels": torch.randint(0, 2, (b["input_ids"].shape[0],), generator=generator)}
        for b in batches
    ]


def bench_model(name: str, args) -> dict:
    model_name = QUICK_MODELS[name] if args.quick else name
    sizes = QUICK if args.quick else FULL[name]
    model, tokenizer = load_benchmark_model(model_name, args.device)
    result = {"model": model_name, "targets": len(find_target_modules(model))}

    if args.overhead_bound:
        sizes = OVERHEAD_BOUND
    samples, seq_len, repeats = sizes["activation"]
    repeats *= args.repeat_factor
    batches = calibration(tokenizer, samples, seq_len, batch_size=sizes.get("batch_size", 8))
    print(f"{model_name}: activation estimator, {describe_batches(batches)}")
    phases = []
    methods = {
        "forward": forward_fn(model, args),
        "forward_regrouped": forward_fn(model, args, regroup=True),
        "senslora": allocation_fn(model, args, phases=phases),
    }
    # the reduction of the hooked inputs the device does not use by default, to see what the
    # default buys there: every input on its own (CPU default) or per forward pass (elsewhere)
    per_input = default_flush_bytes(args.device) == 0
    default, other = ("per_input", "grouped") if per_input else ("grouped", "per_input")
    methods[f"senslora_{other}"] = allocation_fn(
        model, args, flush_bytes=GROUPED_FLUSH_BYTES if per_input else 0
    )
    if args.quick or name == "smollm2":  # MiniLM's head (pooler + classifier) is negligible
        methods["senslora_full_forward"] = allocation_fn(model, args, stop_early=False)
    times = interleaved(methods, batches, warmup_slice(batches), args.device, repeats)
    summary = summarize(times, baseline="forward")
    ratio = summary["senslora"]["wall"]["ratio_paired_median"]
    hooks_ratio = _paired_ratio(times, "senslora", "forward_regrouped")
    saving = None
    if "senslora_full_forward" in times:
        saving = 1 - _paired_ratio(times, "senslora", "senslora_full_forward")
    result["activation"] = {
        "calibration": {"source": "wikipedia", "max_length": seq_len, **describe_batches(batches)},
        "regrouped_padded_tokens": describe_batches(list(regroup_by_length(batches)))[
            "padded_tokens"
        ],
        "repeats": repeats,
        "timings": summary,
        "phases": _phase_medians(phases[1:]),  # without the warm-up call
        "ratio": ratio,
        "ratio_vs_regrouped_forward": hooks_ratio,
        "target": TARGET,
        "met": ratio <= TARGET,
        "early_stop_saving": saving,
        "head": head_share(model),
        "reduction": {
            "default": default,
            "other": other,
            "other_vs_default": _paired_ratio(times, f"senslora_{other}", "senslora"),
            "other_vs_regrouped_forward": _paired_ratio(
                times, f"senslora_{other}", "forward_regrouped"
            ),
        },
    }
    print(
        f"  senslora / forward = {ratio:.3f} (target <= {TARGET}); / forward over the regrouped "
        f"batches = {hooks_ratio:.3f}"
        + ("" if saving is None else f"; early stop saves {saving:.1%}")
    )
    reduction = result["activation"]["reduction"]
    print(
        f"  reduction {default} (default here); {other}: "
        f"{reduction['other_vs_default']:.3f} x the default, "
        f"{reduction['other_vs_regrouped_forward']:.3f} x the regrouped forward"
    )

    if args.overhead_bound:
        return result
    samples, seq_len, repeats = sizes["gradient"]
    repeats *= args.repeat_factor
    small = with_labels(calibration(tokenizer, samples, seq_len, batch_size=4), model)
    print(f"{model_name}: gradient estimators, {describe_batches(small)}")
    phases = {"fisher": [], "hutchinson": []}
    methods = {
        "forward": forward_fn(model, args),
        "fisher": allocation_fn(model, args, "fisher", phases=phases["fisher"]),
        "hutchinson": allocation_fn(model, args, "hutchinson", phases=phases["hutchinson"]),
    }
    # no warm-up call: these take 10-100 forward passes, and a warm-up would double the run
    times = interleaved(methods, small, None, args.device, repeats)
    summary = summarize(times, baseline="forward")
    result["gradient"] = {
        "calibration": {"source": "wikipedia", "max_length": seq_len, **describe_batches(small)},
        "repeats": repeats,
        "timings": summary,
        "phases": {k: _phase_medians(v) for k, v in phases.items()},
        "note": "fisher: per-sample gradients; hutchinson: 8 probes, eager attention; both in "
        "float32 (no autocast)",
    }
    for estimator in ("fisher", "hutchinson"):
        print(f"  {estimator} / forward = {summary[estimator]['wall']['ratio_paired_median']:.1f}")
    return result


def _add_arguments(parser) -> None:
    parser.add_argument(
        "--overhead-bound",
        action="store_true",
        help="4 batches of one 4-token sequence, activation estimator only: the arithmetic is "
        "negligible and the time is that of dispatching operations and running Python, a CPU "
        "stand-in for a launch-bound GPU (results: allocation_overhead-overhead-bound.json)",
    )


def main() -> None:
    args = parse_args("allocation_overhead", __doc__.splitlines()[0], _add_arguments)
    if args.overhead_bound and args.out == RESULTS_DIR / "allocation_overhead.json":
        args.out = RESULTS_DIR / "allocation_overhead-overhead-bound.json"
    torch.manual_seed(0)
    payload = {
        "benchmark": "allocation_overhead",
        "environment": environment(args.device),
        "config": {
            "quick": args.quick,
            "repeat_factor": args.repeat_factor,
            "dtype": args.dtype,
            "avg_rank": AVG_RANK,
            "overhead_bound": args.overhead_bound,
            "sizes": OVERHEAD_BOUND if args.overhead_bound else QUICK if args.quick else FULL,
            "sizes_legend": "(sequences, max length, repeats)",
        },
        "models": [bench_model(name, args) for name in args.models],
    }
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
