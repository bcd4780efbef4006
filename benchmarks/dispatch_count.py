"""Operations dispatched by an allocation, against a plain forward pass: a device-free proxy for
the kernel launches that make the allocation overhead on a GPU.

    .venv/bin/python benchmarks/dispatch_count.py [--quick] [--dtype bfloat16]

On a GPU a small model's forward pass is launch-bound (MiniLM over 32 short sequences: 29 ms on
an H200), so what the allocation adds costs in proportion to the operations it dispatches, not to
their FLOPs. This benchmark counts, with a ``TorchDispatchMode``, the tensor operations that do
work (views, reshapes, detaches, casts to the dtype a tensor already has and other metadata-only
operations are left out: they launch nothing), per calibration batch:

- ``forward``: a plain forward pass over the batches the estimator computes (the same sequences
  regrouped by length);
- ``statistics``: the activation estimator (with its early stop) over the same batches, already
  regrouped, with the reduction it uses on a GPU (the copies of one forward pass reduced together
  per input width), and ``statistics_per_input`` with the CPU's (every input reduced on its own);
  the hooks' share is ``statistics - forward`` (the early stop also removes the head's
  operations, so the share is a lower bound; it includes the two or three operations per batch
  on the attention mask, which stays on the CPU);
- ``metrics_and_ranks``: the operations of ``allocate_ranks`` on tensors (once per allocation).

Per-batch counts are the difference between two runs (``k`` batches and one batch) divided by
``k - 1``, so one-off work (accumulators, final checks) is not spread over the batches. Counts
are deterministic: they do not depend on the machine or its load.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from common import (
    QUICK_MODELS,
    calibration,
    environment,
    load_benchmark_model,
    parse_args,
    plain_forward,
    write_results,
)
from torch.utils._python_dispatch import TorchDispatchMode

import senslora
from senslora.estimators.activation import (
    GROUPED_FLUSH_BYTES,
    collect_activation_statistics,
    regroup_by_length,
)
from senslora.targets import find_target_modules

METADATA_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "detach",
        "alias",
        "expand",
        "t",
        "transpose",
        "permute",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "unsqueeze",
        "squeeze",
        "as_strided",
        "unbind",
        "lift_fresh",
        "_local_scalar_dense",
    }
)
"""Operations that only describe a tensor (or read a scalar back): no kernel of their own."""

BATCH_SIZE = 8


class DispatchCounter(TorchDispatchMode):
    """Counts the dispatched operations by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (args and out is args[0] and func.overloadpacket.__name__ == "to"):  # no-op casts
            self.ops[func.overloadpacket.__name__] += 1
        return out

    def working(self) -> Counter[str]:
        return Counter({k: v for k, v in self.ops.items() if k not in METADATA_OPS})


def count(fn) -> tuple[Counter[str], Any]:
    """The working operations ``fn()`` dispatches, and what it returns."""
    with DispatchCounter() as counter:
        result = fn()
    return counter.working(), result


def per_batch(fn, batches: list) -> tuple[float, Counter[str], Any]:
    """Operations per batch of ``fn(batches)``, one-off work removed (see the module doc), their
    names, and what ``fn(batches)`` returned."""
    (many, result), (one, _) = count(lambda: fn(batches)), count(lambda: fn(batches[:1]))
    extra = many - one
    return sum(extra.values()) / (len(batches) - 1), extra, result


def measure(name: str, args, sequences: int, length: int) -> dict:
    model, tokenizer = load_benchmark_model(name, args.device)
    batches = list(regroup_by_length(calibration(tokenizer, sequences, length, BATCH_SIZE)))
    dtype = args.autocast_dtype
    forward, _, _ = per_batch(lambda b: plain_forward(model, b, args.device, dtype), batches)
    modules = find_target_modules(model)
    counts, ops, statistics = {}, {}, None
    for reduction, flush_bytes in (("grouped", GROUPED_FLUSH_BYTES), ("per_input", 0)):
        counts[reduction], extra, statistics = per_batch(
            lambda b, flush_bytes=flush_bytes: collect_activation_statistics(
                model, modules, b, autocast_dtype=dtype, regroup=False, flush_bytes=flush_bytes
            ),
            batches,
        )
        ops[reduction] = {k: v / (len(batches) - 1) for k, v in extra.most_common()}
    config = senslora.AllocationConfig(avg_rank=4, budget="rank")  # as committed
    metrics, _ = count(lambda: senslora.allocate_ranks(statistics, config))
    return {
        "model": name,
        "targets": len(statistics),
        "batches": len(batches),
        "per_batch": {
            "forward": forward,
            "statistics": counts["grouped"],
            "hooks": counts["grouped"] - forward,
            "statistics_per_input": counts["per_input"],
            "hooks_per_input": counts["per_input"] - forward,
        },
        "statistics_ops_per_batch": ops["grouped"],
        "statistics_per_input_ops_per_batch": ops["per_input"],
        "metrics_and_ranks": sum(metrics.values()),
        "metrics_and_ranks_ops": dict(metrics.most_common()),
    }


def main() -> None:
    args = parse_args("dispatch_count", __doc__.splitlines()[0])
    sequences, length = (16, 32) if args.quick else (32, 128)
    results = []
    for name in args.models:
        model = QUICK_MODELS[name] if args.quick else name
        result = measure(model, args, sequences, length)
        results.append(result)
        counts = result["per_batch"]
        print(
            f"{model}: per batch forward {counts['forward']:.0f}, statistics "
            f"{counts['statistics']:.0f} (hooks {counts['hooks']:+.0f}; reducing every input "
            f"on its own {counts['hooks_per_input']:+.0f}); metrics and ranks "
            f"{result['metrics_and_ranks']} operations for {result['targets']} modules"
        )
    write_results(
        args.out,
        {
            "benchmark": "dispatch_count",
            "environment": environment(args.device),
            "config": {
                "quick": args.quick,
                "dtype": args.dtype,
                "sequences": sequences,
                "max_length": length,
                "batch_size": BATCH_SIZE,
            },
            "models": results,
        },
    )


if __name__ == "__main__":
    main()
