"""Benchmark 2: senslora's allocation vs peft's EVA on the same model, batches and rank budget.

    .venv/bin/python benchmarks/eva_comparison.py [--quick] [--eva-max-forwards N]

- ``senslora``: ``collect_statistics`` (activation) + ``allocate_ranks`` (average rank 4 over
  every linear layer; total rank 4 x matrices);
- ``eva``: ``peft.get_eva_state_dict`` with ``LoraConfig(r=4, init_lora_weights="eva",
  eva_config=EvaConfig())`` over the same target modules (peft's defaults: rho 2, tau 0.99), which
  returns EVA's ranks (same total rank budget) and its initial A matrices: the allocation part of
  ``initialize_lora_eva_weights`` (which then only copies A into the adapters).

What EVA does, from peft/tuners/lora/eva.py: one forward pass that hashes every target's input
(``hash(tuple(x.tolist()))``, in Python) to find layers that share an input; then, cycling over
the batches, every forward pass runs one incremental-PCA step (a randomised low-rank SVD of the
layer input, d_in x 2r components) on every distinct input, and stops a layer once the cosine
similarity of its components between consecutive steps reaches tau. It stops when every layer
has converged, which takes several passes over the calibration set, each with the full model
(heads included). senslora needs one forward pass over the batches (stopped after the last
target), with a sum of squares per input column.

EVA can need many passes (SmolLM2-135M on 32 sequences of up to 256 tokens: 80 forward calls,
20 passes, 10 minutes on one CPU thread), so the full run caps it at ``--eva-max-forwards``
forward calls for SmolLM2 (a lower bound on its time, and so on the ratio);
``--eva-max-forwards 0`` lets it converge. senslora's estimator regroups the sequences by length
(less padding); EVA is also timed once on the regrouped batches where it runs uncapped.
"""

from __future__ import annotations

import collections
import time

import peft
import torch
from common import (
    QUICK_MODELS,
    Samples,
    autocast,
    calibration,
    describe_batches,
    environment,
    load_benchmark_model,
    parse_args,
    plain_forward,
    summarize,
    synchronize,
    timed,
    warmup_slice,
    write_results,
)
from peft.tuners.lora.eva import _Hook

import senslora
from senslora.estimators.activation import regroup_by_length
from senslora.targets import find_target_modules

AVG_RANK = 4
TARGET = 5.0
# model -> sequences, max length, repeats, EVA forward cap (None: the --eva-max-forwards value)
FULL = {
    "minilm": {"sequences": 128, "length": 256, "repeats": 1, "cap": 0},
    "smollm2": {"sequences": 32, "length": 128, "repeats": 1, "cap": None},
}
QUICK = {
    "minilm": {"sequences": 16, "length": 32, "repeats": 1, "cap": 0},
    "smollm2": {"sequences": 16, "length": 32, "repeats": 1, "cap": None},
}


class _EvaCapped(Exception):
    """Raised from EVA's forward function once the forward cap is reached."""


def run_eva(model, names, batches, cap: int, args) -> dict:
    """EVA's state dict (components per module), the forward calls it made, and whether it
    converged (False: stopped at ``cap`` forwards)."""
    config = peft.LoraConfig(
        r=AVG_RANK,
        target_modules=names,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(),
    )
    calls = [0]

    def forward_fn(model, inputs):
        if cap and calls[0] >= cap:
            raise _EvaCapped
        calls[0] += 1
        return model(**inputs)

    try:
        with autocast(args.device, args.autocast_dtype):
            state = peft.get_eva_state_dict(
                model, batches, peft_config=config, forward_fn=forward_fn, show_progress_bar=False
            )
    except _EvaCapped:
        _remove_eva_hooks(model)
        model.eval()
        return {"state": None, "forwards": calls[0], "converged": False}
    return {"state": state, "forwards": calls[0], "converged": True}


def _remove_eva_hooks(model) -> None:
    """EVA leaves its hooks registered when interrupted: remove them."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _Hook):
                del module._forward_hooks[key]


def run_senslora(model, names, batches, args):
    stats = senslora.collect_statistics(
        model, batches, targets=names, autocast_dtype=args.autocast_dtype
    )
    config = senslora.AllocationConfig(avg_rank=AVG_RANK, budget="rank")  # EVA: a rank budget
    return senslora.allocate_ranks(stats, config)


def bench_model(name: str, args) -> dict:
    model_name = QUICK_MODELS[name] if args.quick else name
    sizes = (QUICK if args.quick else FULL)[name]
    cap = args.eva_max_forwards if sizes["cap"] is None else sizes["cap"]
    model, tokenizer = load_benchmark_model(model_name, args.device)
    names = list(find_target_modules(model))
    batches = calibration(tokenizer, sizes["sequences"], sizes["length"])
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    print(f"{model_name}: {describe_batches(batches)}, EVA cap {cap or 'none'}")

    run_senslora(model, names, warmup_slice(batches), args)  # warm-up
    times, results = Samples(["senslora", "eva"]), {}
    methods = {
        "senslora": lambda: run_senslora(model, names, batches, args),
        "eva": lambda: run_eva(model, names, batches, cap, args),
    }
    for round_ in range(sizes["repeats"] * args.repeat_factor):
        order = ["senslora", "eva"] if round_ % 2 == 0 else ["eva", "senslora"]
        for method in order:
            synchronize(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            results[method] = methods[method]()
            synchronize(args.device)
            times.add(method, time.perf_counter() - start, time.process_time() - start_cpu)
        eva, allocation = results["eva"], results["senslora"]
        print(
            f"  round {round_ + 1}: senslora {times['senslora'][-1]:.2f}s, "
            f"eva {times['eva'][-1]:.2f}s ({eva['forwards']} forwards)"
        )
    summary = summarize(times, baseline="senslora")
    speedup = summary["eva"]["wall"]["ratio_paired_median"]
    forward_seconds = _one_forward(model, batches, args)
    result = {
        "model": model_name,
        "targets": len(names),
        "calibration": {
            "source": "wikipedia",
            "max_length": sizes["length"],
            **describe_batches(batches),
        },
        "rank_budget": AVG_RANK * len(names),
        "repeats": sizes["repeats"] * args.repeat_factor,
        "timings": summary,
        "eva_over_senslora": speedup,
        "target": TARGET,
        "met": speedup >= TARGET,
        "eva_forwards": eva["forwards"],
        "eva_passes_over_the_batches": eva["forwards"] / len(batches),
        "eva_converged": eva["converged"],
        "forward_pass_over_the_batches_s": forward_seconds,
        "eva_seconds_per_forward": summary["eva"]["wall"]["median_s"] / max(eva["forwards"], 1),
        "forward_seconds_per_batch": forward_seconds / len(batches),
        "senslora_ranks": _histogram(allocation.ranks.values()),
        "senslora_total_rank": allocation.total_rank,
    }
    if eva["state"] is not None:
        ranks = {n: int(eva["state"][n].shape[0]) if n in eva["state"] else 0 for n in names}
        result["eva_ranks"] = _histogram(ranks.values())
        result["eva_total_rank"] = sum(ranks.values())
    if cap == 0:  # EVA on the batches senslora's estimator computes (regrouped by length)
        regrouped = list(regroup_by_length(batches))
        synchronize(args.device)
        start = time.perf_counter()
        eva_regrouped = run_eva(model, names, regrouped, cap, args)
        synchronize(args.device)
        seconds = time.perf_counter() - start
        result["eva_on_regrouped_batches"] = {
            "seconds": seconds,
            "forwards": eva_regrouped["forwards"],
            "over_senslora": seconds / summary["senslora"]["wall"]["median_s"],
            "padded_tokens": describe_batches(regrouped)["padded_tokens"],
        }
        print(
            f"  EVA on the regrouped batches: {seconds:.2f}s ({eva_regrouped['forwards']} "
            f"forwards), {result['eva_on_regrouped_batches']['over_senslora']:.1f} x senslora"
        )
    bound = "" if eva["converged"] else " (EVA capped: a lower bound)"
    print(f"  EVA / senslora = {speedup:.1f}{bound} (target >= {TARGET})")
    return result


def _one_forward(model, batches, args) -> float:
    wall, _cpu = timed(
        lambda: plain_forward(model, batches, args.device, args.autocast_dtype), args.device
    )
    return wall


def _histogram(ranks) -> dict[str, int]:
    return {str(r): c for r, c in sorted(collections.Counter(ranks).items())}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--eva-max-forwards",
        type=int,
        default=12,
        help="stop EVA on SmolLM2 after this many forward calls (0: until it converges)",
    )


def main() -> None:
    args = parse_args("eva_comparison", __doc__.splitlines()[0], add_arguments)
    torch.manual_seed(0)
    payload = {
        "benchmark": "eva_comparison",
        "environment": environment(args.device),
        "config": {
            "quick": args.quick,
            "repeat_factor": args.repeat_factor,
            "dtype": args.dtype,
            "avg_rank": AVG_RANK,
            "eva_config": {"rho": 2.0, "tau": 0.99, "peft": peft.__version__},
            "eva_max_forwards": args.eva_max_forwards,
            "sizes": QUICK if args.quick else FULL,
        },
        "models": [bench_model(name, args) for name in args.models],
    }
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
