"""Allocation-side controls of the equal-parameter study, on MiniLM with the Wikipedia calibration.

    .venv/bin/python benchmarks/allocation_controls.py [--quick]

One activation calibration (the built-in Wikipedia sample: 128 texts, up to 256 tokens, batches
of 8, seed 0, the ``senslora allocate`` defaults) with ``keep_gram=True``, then, at average rank 4:

- ``senslora`` (rank budget, the paper) and ``senslora-params`` (parameter budget);
- ``inverse`` / ``inverse-params``: ``curvature="inverse"`` (1/[(H + lambda I)^-1]_qq), each
  compared with the default of the same budget (Spearman of theta, ranks changed, L1);
- ``size-prior`` / ``size-prior-params``: theta = d_out * d_in, no data;
- ``shuffled-params``: senslora-params' ranks permuted within shape (seed 0);
- ``matched_uniform_rank`` of senslora's parameter count (the ``lora-matched`` row).

Also the Pearson correlation of theta and the trace of the default. Results:
``results/allocation_controls.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, calibration, environment, load_benchmark_model, write_results

import senslora
from senslora.compare import compare_allocations
from senslora.controls import matched_uniform_rank, shuffle_ranks, size_prior_allocation
from senslora.data import count_tokens


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 8 texts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "allocation_controls-quick.json" if args.quick else "allocation_controls.json"
    args.out = args.out or RESULTS_DIR / name
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def allocations(stats) -> tuple[dict[str, senslora.Allocation], float]:
    """Every row of the study, and the seconds the inverse curvature took (both budgets)."""
    shapes = {n: (s.shape.out_features, s.shape.in_features) for n, s in stats.items()}
    rows = {}
    seconds = 0.0
    for suffix, budget in (("", "rank"), ("-params", "parameters")):
        config = senslora.AllocationConfig(avg_rank=4, budget=budget)
        rows[f"senslora{suffix}"] = senslora.allocate_ranks(stats, config)
        start = time.perf_counter()
        inverse = senslora.AllocationConfig(avg_rank=4, budget=budget, curvature="inverse")
        rows[f"inverse{suffix}"] = senslora.allocate_ranks(stats, inverse)
        seconds += time.perf_counter() - start
        rows[f"size-prior{suffix}"] = size_prior_allocation(shapes, config)
    rows["shuffled-params"] = shuffle_ranks(rows["senslora-params"], seed=0)
    return rows, seconds


COMPARISONS = (
    ("senslora", "inverse"),
    ("senslora-params", "inverse-params"),
    ("senslora", "size-prior"),
    ("senslora-params", "size-prior-params"),
    ("senslora-params", "shuffled-params"),
    ("senslora", "senslora-params"),
)


def main() -> None:
    args = parse()
    env = environment(torch.device("cpu"))
    model, tokenizer = load_benchmark_model("tiny-bert" if args.quick else "minilm", "cpu")
    batches = calibration(tokenizer, 8 if args.quick else 128, 256)
    start = time.perf_counter()
    stats = senslora.collect_statistics(model, batches, keep_gram=True)
    calibration_s = time.perf_counter() - start
    rows, inverse_s = allocations(stats)
    default = rows["senslora"]
    names = list(default.ranks)
    theta = [default.metrics[n]["theta"] for n in names]
    trace = [default.metrics[n]["trace"] for n in names]
    write_results(
        args.out,
        {
            "benchmark": "allocation_controls",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "environment": env,
            "model": "tiny-bert" if args.quick else "minilm",
            "calibration": f"wikipedia, {len(batches)} batches, {count_tokens(batches)} tokens",
            "calibration_with_gram_s": calibration_s,
            "inverse_curvature_and_allocation_s": inverse_s,
            "pearson_theta_trace": float(np.corrcoef(theta, trace)[0, 1]),
            "matched_uniform_rank": {
                name: matched_uniform_rank(rows[name].shapes, rows[name].num_parameters)
                for name in ("senslora", "inverse", "size-prior")
            },
            "num_parameters": {name: a.num_parameters for name, a in rows.items()},
            "total_rank": {name: a.total_rank for name, a in rows.items()},
            "comparisons": {
                f"{b} vs {a}": compare_allocations(rows[a], rows[b]).to_dict()
                for a, b in COMPARISONS
            },
            "ranks": {name: a.ranks for name, a in rows.items()},
            "shuffle_permutation": rows["shuffled-params"].provenance["permutation"],
        },
    )


if __name__ == "__main__":
    main()
