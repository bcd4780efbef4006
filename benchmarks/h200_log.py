"""JSON from the committed log of a GPU training-cost run that was cut off before its JSON.

    .venv/bin/python benchmarks/h200_log.py benchmarks/results/h200/training_cost-cuda-partial.log

The H200 run of ``training_cost.py`` printed one line per step and method, then was stopped by
the end of its device session before it wrote its JSON. This reads those lines
(``  step K: lora 0.039s, senslora 0.031s, ...`` under a ``model: ...`` header) and writes, next
to the log (same name, ``.json``), per model and method: every step time, the median of the steps
after the first (the warm-up) and the median of the per-step ratios to ``lora`` (paired: the
methods ran one after another within a step), as ``training_cost.py`` does.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

STEP = re.compile(r"^\s*step (\d+): (.*)$")
TIMING = re.compile(r"([\w-]+) ([0-9.]+)s")
HEADER = re.compile(r"^(\w+): ")


def parse_steps(lines: list[str]) -> dict[str, dict[str, list[float]]]:
    """model -> method -> step times in seconds, in step order."""
    models: dict[str, dict[str, list[float]]] = {}
    current = None
    for line in lines:
        step = STEP.match(line)
        if step and current is not None:
            for method, seconds in TIMING.findall(step.group(2)):
                models[current].setdefault(method, []).append(float(seconds))
        elif (header := HEADER.match(line)) and not line.startswith(" "):
            current = header.group(1)
            models[current] = {}
    if not models:
        raise ValueError("expected 'model: ...' headers followed by 'step K: ...' lines, got none")
    return models


def summarise(times: dict[str, list[float]], baseline: str = "lora") -> dict[str, dict]:
    """Per method: the timed steps (warm-up dropped), their median and the paired ratio."""
    base = times[baseline][1:]
    out = {}
    for method, seconds in times.items():
        timed = seconds[1:]
        out[method] = {
            "step_seconds": seconds,
            "timed_steps": len(timed),
            "median_step_s": statistics.median(timed),
            "ratio_paired_median": statistics.median(
                t / b for t, b in zip(timed, base, strict=True)
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path)
    args = parser.parse_args()
    models = parse_steps(args.log.read_text().splitlines())
    result = {
        "benchmark": "training_cost",
        "source": args.log.name,
        "environment": {"device": "cuda", "device_name": "NVIDIA H200"},
        "note": "rebuilt from the printed step lines; warm-up = step 1, dropped; the log does "
        "not print the dtype (the GPU command of docs/performance.md passes --dtype bfloat16)",
        "models": {model: summarise(times) for model, times in models.items()},
    }
    out = args.log.with_suffix(".json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    for model, methods in result["models"].items():
        for method, facts in methods.items():
            print(
                f"{model} {method}: median {facts['median_step_s'] * 1000:.0f} ms of "
                f"{facts['timed_steps']}, ratio {facts['ratio_paired_median']:.2f}"
            )


if __name__ == "__main__":
    main()
