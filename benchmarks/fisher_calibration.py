"""Fisher on the task's own labelled examples vs the activation estimator, on MiniLM.

    .venv/bin/python benchmarks/fisher_calibration.py [--quick] [--examples 128] [--repeats 3]

Both estimators read the same ``--examples`` SST-2 training examples (GLUE TSV from
``--glue-dir``, a seeded subset), tokenized as the fine-tuning harness does and padded per batch
of ``--batch-size``: the activation estimator without the labels (one forward pass), the fisher
estimator with them (per-sample gradients of the sequence-classification model's own
cross-entropy ``.loss``; the classifier head is the fresh seeded one a fine-tuning run starts
from). Timed interleaved after a warm-up on one batch (calibration only; the metrics and the
allocation take milliseconds and are the same code for both). Then both statistics go through
``allocate_ranks`` (average rank 4, parameter budget) and `senslora.compare` reports Spearman of
theta and the rank agreement. Results: ``results/fisher_calibration.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, interleaved, summarize, write_results

import senslora
from senslora.compare import compare_allocations
from senslora.finetune.encoding import encode_classification
from senslora.finetune.tasks.base import select_subset
from senslora.finetune.tasks.glue import load_glue

DEFAULT_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 16 examples")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.examples, args.repeats = 16, 1
    name = "fisher_calibration-quick.json" if args.quick else "fisher_calibration.json"
    args.out = args.out or RESULTS_DIR / name
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def labelled_batches(tokenizer, args) -> list[dict[str, torch.Tensor]]:
    """``args.examples`` SST-2 training examples as padded dict batches with ``labels``."""
    task = load_glue("sst2", args.glue_dir)
    examples = select_subset(task.train, args.examples)
    features = encode_classification(tokenizer, examples, args.max_length).features
    return [
        dict(tokenizer.pad(features[i : i + args.batch_size], return_tensors="pt"))
        for i in range(0, len(features), args.batch_size)
    ]


def load(args):
    from common import load_benchmark_model

    torch.manual_seed(0)  # the fresh classifier head
    model, tokenizer = load_benchmark_model("tiny-bert" if args.quick else "minilm", "cpu")
    return model.eval(), tokenizer


def main() -> None:
    args = parse()
    env = environment(torch.device("cpu"))
    model, tokenizer = load(args)
    with_labels = labelled_batches(tokenizer, args)
    without_labels = [{k: v for k, v in b.items() if k != "labels"} for b in with_labels]
    sets = {"all": (without_labels, with_labels), "warm-up": (without_labels[:1], with_labels[:1])}
    collected = {}

    def activation(key):
        collected["activation"] = senslora.collect_statistics(model, sets[key][0])

    def fisher(key):
        collected["fisher"] = senslora.collect_statistics(model, sets[key][1], estimator="fisher")

    methods = {"activation": activation, "fisher": fisher}
    samples = interleaved(methods, "all", "warm-up", torch.device("cpu"), args.repeats)
    config = senslora.AllocationConfig(avg_rank=4, budget="parameters")
    allocations = {name: senslora.allocate_ranks(s, config) for name, s in collected.items()}
    comparison = compare_allocations(allocations["activation"], allocations["fisher"])
    write_results(
        args.out,
        {
            "benchmark": "fisher_calibration",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "environment": env,
            "model": "tiny-bert" if args.quick else "minilm (sequence classification, 2 labels)",
            "data": f"SST-2 train, {args.examples} examples (seed subset), batch {args.batch_size}",
            "tokens": int(sum(int(b["attention_mask"].sum()) for b in with_labels)),
            "timings": summarize(samples, "activation"),
            "allocation_config": config.to_dict(),
            "ranks": {name: a.ranks for name, a in allocations.items()},
            "num_parameters": {name: a.num_parameters for name, a in allocations.items()},
            "comparison_fisher_vs_activation": comparison.to_dict(),
        },
    )


if __name__ == "__main__":
    main()
