"""Do different calibration sets give the same allocation? How many samples are needed?

Our version of the paper's claim that "different calibration sets give nearly identical
Hessians", measured on the shipped models and three real corpora that ship here:

- ``wikipedia``: paragraphs of 106 Wikipedia articles (built in);
- ``rotten_tomatoes``: movie-review snippets (built in);
- ``sst2``: GLUE SST-2 training sentences, read as a local calibration file
  (``/work/shared/data/glue/SST-2/train.tsv``, text field ``sentence``).

For every model and corpus, reference + pool sequences are drawn (seed 0) and split into a
reference and a disjoint pool: 512 + 256 sequences of up to 256 tokens for MiniLM, 256 + 128 of up
to 128 tokens for SmolLM2 (about 8x slower per token on a CPU). Activation statistics are sums
over tokens, so they are collected once per batch of 8 sequences and summed over any set of
batches: the statistics of a chunk of the pool are those `collect_statistics` gives on it.

- corpus vs corpus: the three references against each other, and, as the noise floor, each
  reference against the pool of the same corpus;
- length control: Wikipedia cut to 16 tokens (as short as the review snippets and SST-2
  sentences) against the three references, to tell text length from text kind;
- samples needed: disjoint chunks of 8, 16, ... sequences of the pool (up to the pool size; up
  to 4 chunks per size, mean and worst) against the reference of their corpus.

16 spare sequences are drawn so that the few shorter than 2 tokens (dropped) are replaced: the
reference and the pool are full batches. SmolLM2's vocabulary head is replaced by an identity
(it is never a target).

Each comparison is `senslora.compare.compare_allocations` of the two allocations (default
AllocationConfig, avg rank 4 for MiniLM, 8 for SmolLM2): Spearman and Kendall tau-b of theta and
of the ranks, share of modules whose rank differs, L1 distance of the rank vectors.

Run (8-9 minutes on a 2-core CPU shared with another busy process; one torch thread):

    .venv/bin/python benchmarks/stability.py            # writes benchmarks/results/stability.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from senslora import AllocationConfig, ModuleStats, allocate_ranks, collect_statistics
from senslora.compare import compare_allocations
from senslora.data import CalibrationConfig, calibration_batches
from senslora.files import write_text_atomic
from senslora.models import builtin_model_path, load_model, load_tokenizer

SST2 = "/work/shared/data/glue/SST-2/train.tsv"
CORPORA = {"wikipedia": ("wikipedia", None), "rotten_tomatoes": ("rotten_tomatoes", None)}
CORPORA["sst2"] = (SST2, "sentence")
MODELS = {  # name -> average rank, max tokens per sequence, reference and pool sequences
    "minilm": {"avg_rank": 4, "seq_len": 256, "reference": 512, "pool": 256},
    # SmolLM2 is ~8x slower per token on a CPU: half the sequences, 128 tokens each
    "smollm2": {"avg_rank": 8, "seq_len": 128, "reference": 256, "pool": 128},
}
BATCH = 8
SHORT = 16  # the length control: Wikipedia cut to this many tokens, like the short corpora
SPARE = 16  # extra draws that replace sequences shorter than 2 tokens (dropped)
SIZES = (8, 16, 32, 64, 128, 256)  # those up to the pool size
MAX_REPEATS = 4
SEED = 0
MEASURES = ("spearman_theta", "kendall_theta", "spearman_ranks", "kendall_ranks")
MEASURES += ("share_ranks_differ", "rank_l1", "max_rank_difference")

logger = logging.getLogger("stability")


def per_batch_statistics(model: nn.Module, batches: list[dict]) -> list[dict[str, ModuleStats]]:
    """Activation statistics of every batch on its own (one collect_statistics call each)."""
    return [collect_statistics(model, [batch], distributed=False) for batch in batches]


def summed(parts: list[dict[str, ModuleStats]]) -> dict[str, ModuleStats]:
    """The statistics of the union of the batches: column sums and token counts add up."""
    first = parts[0]
    return {
        name: ModuleStats(
            name=name,
            shape=first[name].shape,
            estimator="activation",
            column_values=torch.stack([p[name].column_values for p in parts]).sum(dim=0),
            num_tokens=sum(p[name].num_tokens for p in parts),
        )
        for name in first
    }


def corpus_statistics(model, tokenizer, source, text_field, settings):
    """Per-batch statistics of reference + pool sequences (seed 0), split into the two."""
    reference_size, pool_size = settings["reference"], settings["pool"]
    config = CalibrationConfig(
        source=source,
        num_samples=reference_size + pool_size + SPARE,
        seq_len=settings["seq_len"],
        batch_size=BATCH,
        seed=SEED,
        text_field=text_field,
    )
    batches = calibration_batches(tokenizer, config)
    start = time.perf_counter()
    parts = per_batch_statistics(model, batches)
    seconds = time.perf_counter() - start
    split = reference_size // BATCH
    reference, pool = parts[:split], parts[split : split + pool_size // BATCH]
    if len(pool) < pool_size // BATCH or len(batches[split + len(pool) - 1]["input_ids"]) < BATCH:
        raise ValueError(f"{source}: expected {reference_size + pool_size} usable sequences")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[:split])
    return reference, pool, {"reference_tokens": tokens, "seconds": round(seconds, 1)}


def comparison(a, b, *, details: bool = False) -> dict:
    result = compare_allocations(a, b)
    row = {key: getattr(result, key) for key in MEASURES}
    if details:
        row["largest_differences"] = result.largest_differences
    return row


def sample_sweep(reference_allocation, pool, config) -> list[dict]:
    """Chunks of the pool of each size against the reference: mean and worst of each measure."""
    rows = []
    for size in (s for s in SIZES if s <= len(pool) * BATCH):
        per_chunk = size // BATCH
        repeats = min(MAX_REPEATS, len(pool) // per_chunk)
        results = [
            comparison(
                reference_allocation,
                allocate_ranks(summed(pool[i * per_chunk : (i + 1) * per_chunk]), config),
            )
            for i in range(repeats)
        ]
        row = {"samples": size, "repeats": repeats}
        for key in MEASURES:
            values = [r[key] for r in results if r[key] is not None]
            row[key] = round(statistics.fmean(values), 4) if values else None
            worst = max if key in ("share_ranks_differ", "rank_l1", "max_rank_difference") else min
            row[f"{key}_worst"] = round(worst(values), 4) if values else None
        rows.append(row)
    return rows


def samples_needed(rows: list[dict], key: str, level: float) -> int | None:
    """The smallest sample size whose mean ``key`` reaches ``level`` and stays there."""
    needed = None
    for row in reversed(rows):
        if row[key] is None or row[key] < level:
            break
        needed = row["samples"]
    return needed


def top_ranks(allocation, count: int = 4) -> list[tuple[str, int]]:
    return sorted(allocation.ranks.items(), key=lambda item: -item[1])[:count]


def rank_counts(allocation) -> dict[int, int]:
    """How many matrices got each rank."""
    return dict(sorted(Counter(allocation.ranks.values()).items()))


def run_model(name: str) -> dict:
    settings = MODELS[name]
    reference_size, pool_size = settings["reference"], settings["pool"]
    path = str(builtin_model_path(name))
    model, tokenizer = load_model(path, device="cpu"), load_tokenizer(path)
    if getattr(model, "lm_head", None) is not None:
        # never a target; without this, the first batch of every per-batch call would compute
        # the 49k-word vocabulary head of SmolLM2 (collect_statistics stops early after that)
        model.lm_head = nn.Identity()
    config = AllocationConfig(avg_rank=settings["avg_rank"], budget="rank")  # as committed
    references, pools, corpora = {}, {}, {}
    for corpus, (source, text_field) in CORPORA.items():
        logger.info("%s: calibrating on %s", name, corpus)
        reference, pool, info = corpus_statistics(model, tokenizer, source, text_field, settings)
        references[corpus] = allocate_ranks(summed(reference), config)
        pools[corpus] = pool
        corpora[corpus] = {
            **info,
            "top_ranks": top_ranks(references[corpus]),
            "rank_counts": rank_counts(references[corpus]),
        }
    names = list(CORPORA)
    cross = [
        {"a": f"{a} ({reference_size})", "b": f"{b} ({reference_size})"}
        | comparison(references[a], references[b], details=True)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    within = [
        {"a": f"{c} ({reference_size})", "b": f"{c} ({pool_size}, disjoint)"}
        | comparison(references[c], allocate_ranks(summed(pools[c]), config), details=True)
        for c in names
    ]
    logger.info("%s: calibrating on wikipedia cut to %d tokens", name, SHORT)
    short_settings = {**settings, "seq_len": SHORT, "pool": 0}
    short, _, info = corpus_statistics(model, tokenizer, "wikipedia", None, short_settings)
    short_allocation = allocate_ranks(summed(short), config)
    corpora[f"wikipedia_{SHORT}"] = {**info, "top_ranks": top_ranks(short_allocation)}
    length_control = [
        {"a": f"wikipedia cut to {SHORT} tokens ({reference_size})", "b": f"{c} ({reference_size})"}
        | comparison(short_allocation, references[c], details=True)
        for c in names
    ]
    sweeps = {c: sample_sweep(references[c], pools[c], config) for c in names}
    needed = {
        c: {
            f"{key}>={level}": samples_needed(sweeps[c], key, level)
            for key in ("spearman_theta", "spearman_ranks")
            for level in (0.9, 0.95, 0.99)
        }
        for c in names
    }
    return {
        "model": name,
        **settings,
        "modules": len(references[names[0]].ranks),
        "corpora": corpora,
        "corpus_vs_corpus": cross,
        "within_corpus": within,
        "length_control": length_control,
        "samples": sweeps,
        "samples_needed": needed,
    }


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _amount(value) -> str:
    return "n/a" if value is None else f"{value:g}"


def render_markdown(results: dict) -> str:
    """The tables of docs/stability.md from the JSON results."""
    measures = ("spearman_theta", "kendall_theta", "spearman_ranks", "kendall_ranks")
    head = "| A | B | Spearman θ | Kendall θ | Spearman ranks | Kendall ranks | ranks differ | L1 |"
    lines = []
    for name, model in results["models"].items():
        lines += [f"### {name} (avg rank {model['avg_rank']}, {model['modules']} matrices)", ""]
        lines += [head, "|---|---|---|---|---|---|---|---|"]
        for row in model["corpus_vs_corpus"] + model["within_corpus"] + model["length_control"]:
            cells = [_cell(row[key]) for key in measures]
            share = f"{100 * row['share_ranks_differ']:.0f} %"
            lines.append(
                f"| {row['a']} | {row['b']} | " + " | ".join(cells) + f" | {share} | "
                f"{row['rank_l1']} |"
            )
        lines += [
            "",
            "| corpus | samples | Spearman θ (worst) | Spearman ranks (worst) | "
            "Kendall ranks | ranks differ | L1 (worst) |",
            "|---|---|---|---|---|---|---|",
        ]
        for corpus, rows in model["samples"].items():
            for row in rows:
                lines.append(
                    f"| {corpus} | {row['samples']} × {row['repeats']} | "
                    f"{_cell(row['spearman_theta'])} ({_cell(row['spearman_theta_worst'])}) | "
                    f"{_cell(row['spearman_ranks'])} ({_cell(row['spearman_ranks_worst'])}) | "
                    f"{_cell(row['kendall_ranks'])} | {100 * row['share_ranks_differ']:.0f} % | "
                    f"{_amount(row['rank_l1'])} ({_amount(row['rank_l1_worst'])}) |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stability.json"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a CPU shared with other busy processes, two spinning "
        "OpenMP threads made the forward passes 10-20x slower here)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the tables of an existing --out and exit"
    )
    args = parser.parse_args()
    if args.markdown:
        print(render_markdown(json.loads(args.out.read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    results = {
        "settings": {
            "batch_size": BATCH,
            "sizes": SIZES,
            "max_repeats": MAX_REPEATS,
            "seed": SEED,
            "estimator": "activation",
            "torch_threads": torch.get_num_threads(),
        },
        "models": {name: run_model(name) for name in args.models},
    }
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s in %.0f s", args.out, results["seconds"])


if __name__ == "__main__":
    main()
