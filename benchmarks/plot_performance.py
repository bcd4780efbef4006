"""Figures of docs/performance.md from the committed benchmark results.

    .venv/bin/python benchmarks/plot_performance.py

Reads results/scaling.json and writes docs/img/scaling.png: allocation time and forward time
against calibration tokens (MiniLM), and statistics memory against model size (bytes held by the
default estimator vs 4 * sum(d_in) and vs 4 * number of weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    scaling = json.loads((HERE / "results" / "scaling.json").read_text())
    rows = scaling["calibration_size"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    tokens = [r["real_tokens"] for r in rows]
    left.plot(tokens, [r["senslora_s"] for r in rows], "o-", label="senslora allocation")
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
    out = HERE.parent / "docs" / "img" / "scaling.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
