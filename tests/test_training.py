"""Every method trains a tiny random model: the loss goes down, budgets hold, bench resumes."""

from __future__ import annotations

import json
import logging
import math
import os
import random

import pytest
import torch
from conftest import resize_with_distinct_rows, tiny_bert, tiny_gpt2
from transformers import AutoTokenizer

from senslora.data.assets import minilm_path
from senslora.finetune.config import TrainConfig
from senslora.finetune.grid import load_spec, run_bench
from senslora.finetune.training import run_training

WORDS = ["film", "story", "actor", "scene", "plot", "music", "ending", "cast"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random BERT and GPT-2 folders with the shipped MiniLM tokenizer, and task files."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    except FileNotFoundError:
        pytest.skip("the MiniLM package is not installed (make setup)")
    root = tmp_path_factory.mktemp("training")
    tokenizer.eos_token = "[SEP]"
    for name, model in (("bert", tiny_bert()), ("gpt2", tiny_gpt2()), ("bert-same-rows", None)):
        if model is None:  # the plain resize: every word embedded alike, low-rank activations
            model = tiny_bert()
            model.resize_token_embeddings(tokenizer.vocab_size)
        else:
            resize_with_distinct_rows(model, tokenizer.vocab_size)  # words told apart: it learns
        model.config.eos_token_id = tokenizer.sep_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    for split, n in (("", 96), (".dev", 32)):
        rows = ["text,label"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(WORDS, 4) + ["great" if label else "awful"]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)},{label}")
        (root / f"sentiment{split}.csv").write_text("\n".join(rows) + "\n")
        lines = [
            json.dumps({"instruction": f"Repeat: {w}", "response": w})
            for w in rng.choices(WORDS, k=n)
        ]
        (root / f"echo{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train(folders, tmp_path, **options):
    defaults = dict(
        task=f"csv:{folders / 'sentiment.csv'}",
        model=str(folders / "bert"),
        avg_rank=2,
        epochs=4,
        batch_size=16,
        learning_rate=5e-3,
        calib_samples=8,
        calib_seq_len=16,
        device="cpu",
        max_length=32,
        pooling="mean",  # the tiny BERT's random [CLS] pooler learns too slowly for 24 steps
    )
    config = TrainConfig(**{**defaults, **options})
    return run_training(config, tmp_path / config.method, progress=False)


@pytest.mark.parametrize("method", ["lora", "senslora", "senslora-pra", "adalora", "eva"])
def test_each_method_trains_and_reports(folders, tmp_path, method):
    results = train(folders, tmp_path, method=method)
    assert len(results["epochs"]) == 4
    train_losses = results["train_losses"]
    assert train_losses[-1] < train_losses[0], train_losses
    assert results["parameters"]["lora"] > 0
    assert (tmp_path / method / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / method / "checkpoints").exists()
    epochs = results["epochs"]
    assert results["last"] == epochs[-1]
    assert results["best"] == max(epochs, key=lambda row: row["accuracy"])
    assert [row["epoch"] for row in epochs] == [1.0, 2.0, 3.0, 4.0]
    if method == "adalora":
        assert results["stalled"] is None  # its loss carries the orthogonality regulariser
    else:
        assert results["stalled"] is False, train_losses
    dev = [int(line.rsplit(",", 1)[1]) for line in read_lines(folders / "sentiment.dev.csv")]
    majority = max(sum(dev), len(dev) - sum(dev)) / len(dev)
    assert results["last"]["accuracy"] > majority + 0.1  # it learnt the task, not the prior


def read_lines(path):
    """The data rows of a task CSV (its header left out)."""
    return path.read_text().splitlines()[1:]


def test_a_run_that_learns_nothing_is_flagged_stalled_and_warns(folders, tmp_path, caplog):
    labels = [int(line.rsplit(",", 1)[1]) for line in read_lines(folders / "sentiment.csv")]
    share = sum(labels) / len(labels)
    prior = -(share * math.log(share) + (1 - share) * math.log(1 - share))
    with caplog.at_level(logging.WARNING, logger="senslora.finetune.training"):
        results = train(folders, tmp_path, learning_rate=1e-9, head_learning_rate=1e-9)
    assert any("it stalled" in record.getMessage() for record in caplog.records)
    assert results["label_prior_loss"] == pytest.approx(prior)
    assert results["stalled"] is True
    assert results["train_losses"][-1] >= 0.98 * prior


def test_senslora_keeps_the_rank_budget_of_lora(folders, tmp_path):
    results = train(folders, tmp_path, method="senslora", epochs=1)
    assert sum(results["ranks"].values()) == 2 * len(results["ranks"]) == 2 * 12
    assert (tmp_path / "senslora" / "allocation.json").exists()


def test_senslora_max_rank_caps_every_matrix(folders, tmp_path):
    uncapped = train(folders, tmp_path / "free", method="senslora", epochs=1)["ranks"]
    assert max(uncapped.values()) > 2  # the cap below binds
    capped = train(folders, tmp_path / "capped", method="senslora", epochs=1, max_rank=2)
    assert max(capped["ranks"].values()) <= 2
    assert sum(capped["ranks"].values()) == sum(uncapped.values())  # the surplus moves elsewhere
    assert capped["config"]["max_rank"] == 2


def test_senslora_parameter_budget_stays_within_lora_parameters(folders, tmp_path):
    lora = train(folders, tmp_path / "lora", method="lora", epochs=1)
    matched = train(folders, tmp_path / "params", method="senslora", epochs=1, budget="parameters")
    assert matched["parameters"]["lora"] <= lora["parameters"]["lora"]
    assert matched["config"]["budget"] == "parameters"
    saved = json.loads((tmp_path / "params" / "senslora" / "allocation.json").read_text())
    assert saved["config"]["budget"] == "parameters"


def test_adalora_budget_really_shrinks(folders, tmp_path):
    results = train(folders, tmp_path, method="adalora", epochs=6)
    ranks = results["ranks"]
    assert len(ranks) == 12
    initial = 3 * len(ranks)  # init_r = 3 for avg_rank 2
    assert sum(ranks.values()) < initial
    assert sum(ranks.values()) <= 2 * len(ranks)


def test_eva_redistributes_ranks(folders, tmp_path):
    # EVA moves ranks to where the activations' variance concentrates; the random embeddings
    # of the distinct-rows model are too isotropic for that, the same-rows model's are not
    results = train(
        folders, tmp_path, method="eva", epochs=1, model=str(folders / "bert-same-rows")
    )
    ranks = results["ranks"]
    assert sum(ranks.values()) == 2 * len(ranks)
    assert len(set(ranks.values())) > 1


def test_generation_task_trains_with_response_only_loss(folders, tmp_path):
    results = train(
        folders,
        tmp_path,
        method="senslora",
        model=str(folders / "gpt2"),
        task=f"gen:{folders / 'echo.jsonl'}",
        epochs=2,
        max_new_tokens=4,
    )
    assert set(results["last"]) >= {"bleu4", "rouge1", "rougeL", "nll", "perplexity", "epoch"}
    assert (
        results["train_losses"][-1] < results["train_losses"][0] - 0.05
    )  # learns (the noise is ~1e-5)
    last = results["last"]
    assert 0 < last["nll"] < 20 and last["perplexity"] == pytest.approx(math.exp(last["nll"]))


def test_finished_run_is_refused_without_overwrite(folders, tmp_path):
    train(folders, tmp_path, method="lora", epochs=1)
    with pytest.raises(ValueError, match="--overwrite"):
        train(folders, tmp_path, method="lora", epochs=1)


def test_bench_resumes_without_rerunning(folders, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
out = "grid"
methods = ["lora", "senslora"]
tasks = ["csv:{folders / "sentiment.csv"}"]
seeds = [0, 1]
[defaults]
model = "{folders / "bert"}"
avg_rank = 2
epochs = 1
batch_size = 32
calib_samples = 8
calib_seq_len = 16
device = "cpu"
""")
    bench = load_spec(spec)
    calls = []

    def runner(config, out):
        calls.append((config.method, config.seed))
        return run_training(config, out, progress=False)

    first = run_bench(bench, runner)
    assert first == {"ran": 4, "skipped": 0, "busy": 0}
    assert not list(bench.out.rglob("running.lock"))  # every lock released
    (bench.run_dir(bench.tasks[0], "senslora", 1) / "results.json").unlink()
    (bench.run_dir(bench.tasks[0], "lora", 1) / "results.json").unlink()
    # another live bench process holds lora / seed 1: left to it
    (bench.run_dir(bench.tasks[0], "lora", 1) / "running.lock").write_text(str(os.getppid()))
    second = run_bench(bench, runner)
    assert second == {"ran": 1, "skipped": 2, "busy": 1}
    assert calls[-1] == ("senslora", 1)
    summary = json.loads((bench.out / "results.json").read_text())["main"]
    row = summary["table"]["senslora"][bench.tasks[0]]
    assert row["n"] == 2 and row["diff_vs_lora"]["n"] == 1  # lora / seed 1 still running
    assert "Paired difference" in (bench.out / "results.md").read_text()


def _bench_result(method: str, seed: int, parameters: dict[str, int]) -> dict:
    """A finished run's results.json, as the bench tables read it (task "t", accuracy 0.5)."""
    return {
        "method": method,
        "task": "t",
        "config": {"seed": seed},
        "main_metric": "accuracy",
        "last": {"accuracy": 0.5},
        "best": {"accuracy": 0.5},
        "parameters": parameters,
    }


def test_bench_counts_the_hypernetwork_as_adapter_parameters():
    from senslora.finetune.tables import adapter_parameters, aggregate

    lora = _bench_result("lora", 0, {"lora": 100})
    hyper = _bench_result("hyperadalora", 0, {"lora": 0, "hypernetwork": 250})
    assert adapter_parameters(lora) == 100 and adapter_parameters(hyper) == 250
    table = aggregate([lora, hyper], ["lora", "hyperadalora"], ["t"])["table"]
    assert table["hyperadalora"]["t"]["params"] == 250
    assert table["lora"]["t"]["params"] == 100


def test_bench_table_gives_the_range_of_parameters_over_seeds():
    """An allocation depends on the seed's calibration sample: the count may differ by seed."""
    from senslora.finetune.tables import aggregate, render_markdown

    runs = [_bench_result("lora", s, {"lora": 1000}) for s in (0, 1)]
    runs += [
        _bench_result("senslora", 0, {"lora": 1200}),
        _bench_result("senslora", 1, {"lora": 1152}),
    ]
    summary = aggregate(runs, ["lora", "senslora"], ["t"])
    assert summary["table"]["senslora"]["t"]["params_range"] == [1152, 1200]
    table = render_markdown(summary)
    assert "| 1,000 |" in table and "| 1,152–1,200 |" in table


@pytest.mark.real_model
def test_demo_quick_runs_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from senslora.cli import app

    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "lora, senslora and the size prior" in result.output
    report = (tmp_path / "report.md").read_text()
    assert "| lora |" in report and "| senslora |" in report and "| size-prior |" in report
    counts = {}
    for method in ("lora", "senslora", "size-prior"):
        saved = json.loads((tmp_path / method / "results.json").read_text())
        counts[method] = saved["parameters"]["lora"]
    assert counts["senslora"] <= counts["lora"] and counts["size-prior"] <= counts["lora"]
    assert (tmp_path / "ranks.png").exists()


def test_train_command_takes_the_hyperadalora_options(folders, tmp_path):
    from typer.testing import CliRunner

    from senslora.cli import app

    out = tmp_path / "run"
    args = ["train", "--method", "hyperadalora", "--hyperadalora-init", "senslora"]
    args += ["--eval-steps", "3", "--task", f"csv:{folders / 'sentiment.csv'}"]
    args += ["--model", str(folders / "bert"), "--avg-rank", "2", "--epochs", "2"]
    args += ["--batch-size", "16", "--calib-samples", "8", "--calib-seq-len", "16"]
    args += ["--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["hyperadalora_init"] == "senslora"
    assert [e["step"] for e in saved["evals"]] == [3, 6, 9, 12]
    printed = " ".join(result.output.split())  # rich wraps long lines
    assert f"{saved['parameters']['hypernetwork']:,} adapter parameters" in printed
    bad = CliRunner().invoke(app, [*args[:4], "sometimes", *args[5:-1], str(tmp_path / "x")])
    assert bad.exit_code == 2 and "hyperadalora_init must be one of" in " ".join(bad.output.split())


def test_evaluation_at_start_is_the_untuned_model_and_stays_out_of_best(folders, tmp_path):
    results = train(folders, tmp_path, method="lora", epochs=1, eval_at_start=True)
    start, *trained = results["evals"]
    assert (start["step"], start["epoch"]) == (0, 0.0)
    assert len(trained) == 1 and trained[0]["step"] > 0
    assert len(results["epochs"]) == 1 and results["best"]["epoch"] == 1.0
    untuned = train(
        folders,
        tmp_path / "untuned",
        method="lora",
        epochs=1,
        learning_rate=1e-12,
        head_learning_rate=1e-12,  # the head too: the run must not move at all
    )
    assert start["accuracy"] == pytest.approx(untuned["last"]["accuracy"])  # B = 0: base model


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_mixed_precision_trains_under_bf16_autocast_with_float32_adapters(
    folders, tmp_path, monkeypatch, mixed_precision
):
    from safetensors.torch import load_file

    seen = []  # was autocast on when a linear layer ran with gradients (training steps)?
    forward = torch.nn.Linear.forward

    def recording(self, x):
        if torch.is_grad_enabled():
            seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    results = train(folders, tmp_path, method="lora", epochs=2, mixed_precision=mixed_precision)
    assert results["config"]["mixed_precision"] == mixed_precision
    assert seen and set(seen) == {mixed_precision == "bf16"}
    assert results["train_losses"][-1] < results["train_losses"][0]
    weights = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # master weights stay fp32


def test_mixed_precision_is_checked():
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


def test_stall_reading_of_the_training_loss():
    from types import SimpleNamespace

    from senslora.finetune.results import label_prior_loss, stalled

    examples = [SimpleNamespace(label=y) for y in (0, 0, 0, 1)]
    prior = label_prior_loss(SimpleNamespace(num_labels=2, train=examples))
    assert prior == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert label_prior_loss(SimpleNamespace(num_labels=1, train=examples)) is None  # regression
    assert label_prior_loss(SimpleNamespace(train=examples)) is None  # generation
    # CoLA: prior 0.607; the stalled study run ended at 0.608, one that trained at 0.414
    assert stalled([0.616, 0.608], 0.607) is True
    assert stalled([0.607, 0.414], 0.607) is False
    assert stalled([0.60, 0.594], 0.607) is False  # over 2% below the prior: learning has begun
    assert stalled([0.60, 0.595], 0.607) is True  # within 2% (0.98 x 0.607 = 0.5949)
    assert stalled([0.5], None) is None and stalled([], 0.607) is None
