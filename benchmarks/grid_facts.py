"""Parameter counts, devices and memory of finished bench runs, read from their results.json.

    R=benchmarks/results
    .venv/bin/python benchmarks/grid_facts.py $R/glue-minilm $R/glue-minilm-senslora-params \
        $R/glue-minilm-adalora-lr5e-3 $R/glue-minilm-device-check $R/nlg-smollm2 \
        $R/nlg-smollm2-capped --out $R/grid_facts.json

For every grid and method it prints (and writes to ``--out`` as JSON):

- ``trained``: the adapter parameters that are trained, ``parameters.lora`` (the adapters at their
  initial ranks: AdaLoRA's P, E, Q at 1.5 x the rank) plus ``parameters.hypernetwork``
  (HyperAdaLoRA's generator, whose factors have no parameters of their own); the task head is
  left out (``parameters.trainable`` includes it);
- ``saved``: the adapter that is saved after training, ``parameters.final_lora`` where the method
  prunes or materialises (AdaLoRA, HyperAdaLoRA), else ``parameters.lora``;
- ``state_bytes``: the analytic fp32 training state of all trainable parameters (head included),
  ``trainable x (4 weight + 4 gradient + 2 x 4 AdamW moments)`` bytes, plus, for AdaLoRA, the
  three importance tensors per adapter parameter that peft's ``RankAllocator`` keeps (12 bytes);
- ``devices``: the device of each seed, and ``peak_memory_mb``: the median per device of the
  runs' ``peak_memory_mb`` (CUDA: ``max_memory_allocated``, every live tensor of the process; CPU:
  peak resident memory of the whole process; the two are not comparable);
- ``last``: the last evaluation's main metric (percent) per task and seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FP32_TRAINING_BYTES = 4 + 4 + 2 * 4  # weight, gradient, AdamW's two moments
ADALORA_ALLOCATOR_BYTES = 3 * 4  # peft RankAllocator: ipt, exp_avg_ipt, exp_avg_unc


def run_facts(result: dict) -> dict:
    """The parameter, memory and score facts of one results.json."""
    counts = result["parameters"]
    trained = counts["lora"] + counts["hypernetwork"]
    saved = counts["final_lora"] or counts["lora"]
    state = counts["trainable"] * FP32_TRAINING_BYTES
    if result["method"] == "adalora":
        state += counts["lora"] * ADALORA_ALLOCATOR_BYTES
    metric = result["main_metric"]
    return {
        "task": result["task"],
        "seed": int(result["config"]["seed"]),
        "device": result["device"],
        "trainable": counts["trainable"],
        "trained": trained,
        "saved": saved,
        "state_bytes": state,
        "peak_memory_mb": result.get("peak_memory_mb"),
        "last": round(100.0 * float(result["last"][metric]), 2),
    }


def span(values: list[int]) -> list[int]:
    return [min(values), max(values)]


def method_facts(runs: list[dict]) -> dict:
    """Ranges over the runs of one method, devices per seed and median peak memory per device."""
    by_device: dict[str, list[float]] = {}
    for run in runs:
        if run["peak_memory_mb"] is not None:
            by_device.setdefault(run["device"], []).append(run["peak_memory_mb"])
    return {
        "trainable": span([r["trainable"] for r in runs]),
        "trained": span([r["trained"] for r in runs]),
        "saved": span([r["saved"] for r in runs]),
        "state_bytes": span([r["state_bytes"] for r in runs]),
        "devices": {str(r["seed"]): r["device"] for r in runs},
        "peak_memory_mb": {d: statistics.median(v) for d, v in sorted(by_device.items())},
        "last": {f"{r['task']} seed{r['seed']}": r["last"] for r in runs},
    }


def grid_facts(grid: Path) -> dict[str, dict]:
    """method -> facts, over every ``<task>/<method>/seed<k>/results.json`` under ``grid``."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(grid.glob("*/*/seed*/results.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["method"], []).append(run_facts(result))
    if not runs:
        raise ValueError(f"expected <task>/<method>/seed<k>/results.json under {grid}, got none")
    return {method: method_facts(method_runs) for method, method_runs in sorted(runs.items())}


def fmt(pair: list[int]) -> str:
    low, high = pair
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write every fact as JSON here")
    args = parser.parse_args()
    facts = {str(grid): grid_facts(grid) for grid in args.grids}
    for grid, methods in facts.items():
        print(f"\n{grid}\n| method | trained | saved | state bytes | devices | peak MB |")
        for name, f in methods.items():
            devices = ", ".join(f"{s}: {d}" for s, d in f["devices"].items())
            memory = ", ".join(f"{d} {m:.0f}" for d, m in f["peak_memory_mb"].items())
            print(
                f"| {name} | {fmt(f['trained'])} | {fmt(f['saved'])} | "
                f"{fmt(f['state_bytes'])} | {devices} | {memory} |"
            )
    if args.out:
        args.out.write_text(json.dumps(facts, indent=1) + "\n")


if __name__ == "__main__":
    main()
