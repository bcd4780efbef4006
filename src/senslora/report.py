"""Tables and plots of an allocation: ranks per layer x module type."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from rich.table import Table

from senslora.allocation import Allocation
from senslora.files import atomic_path

_LAYER = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<index>\d+)\.(?P<kind>.+)$")

SCORE_LABELS = {
    "global": "global (trace)",
    "topk": "Top-k",
    "effective_rank": "effective rank",
    "combined": "combined (Sensitivity-LoRA)",
}


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """``encoder.layer.3.attention.self.query`` -> (3, ``attention.self.query``)."""
    match = _LAYER.match(name)
    if match is None:
        return None, name
    return int(match["index"]), match["kind"]


def short_kinds(kinds: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that still tells each module kind apart
    (``attention.self.query`` -> ``query``, but ``attention.output.dense`` stays whole)."""
    short = {}
    for kind in kinds:
        parts = kind.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in kinds) == 1:
                break
        short[kind] = suffix
    return short


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[int | None], list[str], dict]:
    """Layers, short module kinds (in model order) and ``{(layer, kind): rank}``."""
    named = [(*layer_and_kind(name), rank) for name, rank in ranks.items()]
    short = short_kinds(list(dict.fromkeys(kind for _, kind, _ in named)))
    layers = list(dict.fromkeys(layer for layer, _, _ in named))
    kinds = list(dict.fromkeys(short.values()))
    grid = {(layer, short[kind]): rank for layer, kind, rank in named}
    return layers, kinds, grid


def rank_table(allocation: Allocation, title: str | None = None) -> Table:
    """A rich table: one row per layer, one column per module type, ranks in the cells."""
    layers, kinds, grid = rank_grid(allocation.ranks)
    table = Table(title=title or _title(allocation), title_justify="left")
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("sum", justify="right", style="bold")
    for layer in layers:
        row = [grid.get((layer, kind)) for kind in kinds]
        total = sum(r for r in row if r is not None)
        table.add_row(
            "-" if layer is None else str(layer),
            *["" if r is None else str(r) for r in row],
            str(total),
        )
    return table


def _title(allocation: Allocation) -> str:
    config = allocation.config
    n = len(allocation.ranks)
    return (
        f"LoRA ranks ({config.scheme.upper()}, score={config.score}, avg {config.avg_rank}): "
        f"total rank {allocation.total_rank} over {n} matrices, "
        f"{allocation.num_parameters:,} trainable parameters "
        f"(uniform r={config.avg_rank}: {allocation.uniform_parameters():,})"
    )


def concentration_note(allocation: Allocation, top: int = 3, share: float = 0.5) -> str | None:
    """A warning when ``top`` matrices or fewer hold at least ``share`` of the total rank, else
    None: it names the fewest matrices that do, the rank and share of each, and the fix.

    Uniform ranks give ``share`` of the budget to ``share`` of the matrices; here a handful take
    it. On decoders with massive activations this is what the paper's equations produce: the
    first token of every sequence (an attention sink) holds most of the activation trace of a
    few ``down_proj`` matrices, top-k follows the trace and the σ/μ² weights favour the most
    heavy-tailed metric, so the combined score is the trace again (docs/method.md, "Decoders and
    massive activations"). The note points to the statistics that leave the sink tokens out
    (``skip_positions`` / ``outlier_factor`` of `collect_statistics`), to the Fisher estimator
    (which spread both SmolLM2's and Gemma-3's allocation where the filters spread only
    SmolLM2's; benchmarks/results/decoder_diagnosis.json) and to ``max_rank``.
    Models with fewer than ``4 * top`` matrices are never flagged: there, a few matrices are
    much of the model.
    """
    ranks, total = allocation.ranks, allocation.total_rank
    if len(ranks) < 4 * top or total == 0:
        return None
    largest = sorted(ranks.items(), key=lambda item: item[1], reverse=True)
    held, count = 0, 0
    while count < len(largest) and held < share * total:
        held += largest[count][1]
        count += 1
    if count > top:
        return None
    full = [n for n, r in ranks.items() if r > 0 and r == min(allocation.shapes[n])]
    listed = ", ".join(f"{name} {rank} ({rank / total:.0%})" for name, rank in largest[:count])
    return (
        f"{count} of {len(ranks)} matrices hold {held / total:.0%} of the total rank ({listed}); "
        f"uniform ranks would spread {share:.0%} of it over {round(share * len(ranks))}"
        + (f"; {len(full)} at full rank" if full else "")
        + ". On a decoder this is the mark of massive activations (docs/method.md, 'Decoders "
        "and massive activations'): collect_statistics(..., skip_positions=1) or "
        "outlier_factor=10 leave the attention-sink tokens out, the fisher estimator "
        "(--estimator fisher, next-token loss) weighs inputs by what the loss sees; max_rank "
        "(--max-rank) caps any one matrix."
    )


def layer_totals(ranks: Mapping[str, int]) -> dict[int | None, int]:
    """Sum of ranks per layer."""
    totals: dict[int | None, int] = defaultdict(int)
    for name, rank in ranks.items():
        totals[layer_and_kind(name)[0]] += rank
    return dict(totals)


def plot_ranks(allocations: Mapping[str, Allocation], path: str | Path) -> Path:
    """The paper's Figure 3 for this model: ranks per layer under each metric (grouped bars),
    and a heat map of the combined allocation per layer x module type. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(allocations)
    main = allocations[labels[-1]]
    layers, kinds, grid = rank_grid(main.ranks)
    fig, (bars, heat) = plt.subplots(
        2, 1, figsize=(max(7.0, 0.6 * len(layers) + 3), 8), gridspec_kw={"height_ratios": [1, 1.2]}
    )
    x = np.arange(len(layers))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        totals = layer_totals(allocations[label].ranks)
        bars.bar(
            x + (i - (len(labels) - 1) / 2) * width,
            [totals.get(layer, 0) for layer in layers],
            width,
            label=SCORE_LABELS.get(label, label),
        )
    bars.set_xticks(x, ["-" if layer is None else str(layer) for layer in layers])
    bars.set_xlabel("layer")
    bars.set_ylabel("rank allocated to the layer")
    bars.set_title("Rank per layer under each sensitivity metric (SRA)")
    bars.set_ylim(0, 1.3 * max(bar.get_height() for bar in bars.patches))
    bars.legend(fontsize=8, ncol=2, loc="upper left")

    matrix = np.array([[grid.get((layer, kind), np.nan) for kind in kinds] for layer in layers])
    image = heat.imshow(matrix.T, aspect="auto", cmap="viridis")
    heat.set_xticks(x, ["-" if layer is None else str(layer) for layer in layers])
    heat.set_yticks(np.arange(len(kinds)), kinds, fontsize=8)
    heat.set_xlabel("layer")
    heat.set_title(f"{SCORE_LABELS.get(labels[-1], labels[-1])}: rank per module")
    for (col, row), value in np.ndenumerate(matrix.T):
        if not np.isnan(value):
            heat.text(row, col, int(value), ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=heat, label="rank")
    return save_png(fig, path, dpi=120)


def save_png(fig, path: str | Path, dpi: int) -> Path:
    """Lay out, write atomically as PNG, and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path
