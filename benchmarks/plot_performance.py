"""Figures of docs/performance.md from the committed benchmark results.

    .venv/bin/python benchmarks/plot_performance.py [--scaling JSON] [--out PNG]

Reads results/scaling.json and writes docs/img/scaling.png: allocation time against calibration
tokens (MiniLM) with its least-squares line, and statistics memory against model size (bytes held
by the default estimator vs 4 * number of weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def plot_scaling(scaling_json: Path, out: Path) -> None:
    scaling = json.loads(scaling_json.read_text())
    rows = scaling["calibration_size"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    tokens = [r["real_tokens"] for r in rows]
    left.plot(tokens, [r["senslora_s"] for r in rows], "o", label="senslora allocation")
    fit = scaling["calibration_size"]["fit_seconds_vs_real_tokens"]
    left.plot(
        tokens,
        [fit["intercept"] + fit["slope"] * t for t in tokens],
        "--",
        label=f"{fit['intercept']:.3f} s + {fit['slope'] * 1e6:.0f} µs x token "
        f"(R² {fit['r2']:.4f})",
    )
    if all("forward_s" in r for r in rows):  # results of the first version of the benchmark
        left.plot(tokens, [r["forward_s"] for r in rows], "s--", label="plain forward")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("calibration tokens (MiniLM, 8 to 512 sequences)")
    left.set_ylabel("seconds (1 CPU thread)")
    left.legend()
    left.grid(alpha=0.3, which="both")
    models = scaling["model_size"]["rows"]
    weights = [m["weights"] for m in models]
    right.loglog(weights, [m["statistics_bytes"] for m in models], "o", label="statistics held")
    right.loglog(
        weights, [m["full_diagonal_bytes_4_weights"] for m in models], "x", label="4 x weights"
    )
    for m in models:
        if m["model"] in ("minilm", "smollm2"):
            right.annotate(m["model"], (m["weights"], m["statistics_bytes"]), fontsize=8)
    right.set_xlabel("adapted weights")
    right.set_ylabel("bytes")
    right.legend()
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", type=Path, default=HERE / "results" / "scaling.json")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img" / "scaling.png")
    args = parser.parse_args()
    plot_scaling(args.scaling, args.out)


if __name__ == "__main__":
    main()
