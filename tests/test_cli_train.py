"""`senslora train` options through typer's CliRunner on a tiny random BERT and tiny local data:
each option must reach the run and show in what it writes (results.json, allocation.json, the
adapter), and a bad option must end in a one-line error (exit 2) with no run folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from method_hooks import WithCallback
from safetensors.torch import load_file
from test_training import (
    WORDS,
    folders,  # noqa: F401  (fixture: tiny model folders and task files)
)
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
)
from typer.testing import CliRunner

from senslora.controls import matched_uniform_rank, uniform_lora_parameters
from senslora.finetune import training
from senslora.finetune.heads import PooledClassifier, is_head_parameter
from senslora.finetune.methods import sensitivity
from senslora.serialization import load_allocation

TINY = ["--avg-rank", "2", "--epochs", "1", "--batch-size", "8", "--max-length", "32"]
TINY += ["--calib-samples", "8", "--calib-seq-len", "16", "--device", "cpu"]
SHORT = ["--train-limit", "32", "--dev-limit", "16"]
"""Four optimizer steps. A tiny run takes about 1 s with one torch thread, 10-15 s with two on
a 2-core machine busy with other work (the threads wait for each other): hence `slow`."""


def train(*args) -> tuple:
    """``senslora train ARGS`` in-process: (exit code, output, results.json or None)."""
    from senslora.cli import app

    args = [str(a) for a in args]
    result = CliRunner().invoke(app, ["train", *args])
    out = args[args.index("--out") + 1]
    path = Path(out) / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    return result.exit_code, result.output, saved


def write_sst2(folder, rng: random.Random) -> None:
    """A glue_data-layout SST-2 folder: SST-2/{train,dev}.tsv with 'sentence<TAB>label'."""
    (folder / "SST-2").mkdir(parents=True)
    for name, n in (("train", 40), ("dev", 16)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            rows.append(" ".join(rng.sample(WORDS, 4) + ["great" if label else "awful"]))
            rows[-1] += f"\t{label}"
        (folder / "SST-2" / f"{name}.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def wide_bert(folders, tmp_path_factory):  # noqa: F811
    """The tiny BERT with a 96-wide feed-forward layer (16 x 16 and 16 x 96 matrices): shapes
    far enough apart that senslora's ranks change the parameter count (the rank budget spends
    more than uniform LoRA, the matched uniform rank differs from the average rank) and that
    the size prior tells them apart. On the 24-wide model all three coincide with uniform."""
    folder = tmp_path_factory.mktemp("wide-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folders / "bert")
    model = BertForSequenceClassification(config)
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def glue_run(wide_bert, tmp_path_factory):
    """One senslora run with --glue-dir, the limits, --calib task (read by the activation
    estimator), --learning-rate and --budget parameters: each test below checks one of them."""
    root = tmp_path_factory.mktemp("glue-run")
    write_sst2(root / "glue", random.Random(1))
    out = root / "run"
    code, output, saved = train(
        "--method", "senslora", "--task", "glue:sst2", "--glue-dir", root / "glue",
        "--model", wide_bert, "--train-limit", 24, "--dev-limit", 8, "--calib", "task",
        "--estimator", "activation", "--learning-rate", 3e-3, "--budget", "parameters", *TINY,
        "--out", out,
    )  # fmt: skip
    assert code == 0, output
    return saved, load_allocation(out / "allocation.json")


@pytest.mark.slow  # the shared run above (3 steps)
def test_glue_dir_reads_the_local_glue_layout(glue_run):
    saved, _ = glue_run
    assert saved["task"] == "glue:sst2" == saved["config"]["task"]
    assert saved["config"]["glue_dir"].endswith("glue")
    assert saved["main_metric"] == "accuracy"


@pytest.mark.slow
def test_train_and_dev_limits_set_the_example_counts(glue_run):
    saved, _ = glue_run  # the folder holds 40 training and 16 dev examples
    assert saved["num_train"] == 24
    assert saved["num_dev"] == {"dev": 8}
    assert len(saved["train_losses"]) == 1 and saved["config"]["train_limit"] == 24


@pytest.mark.slow
def test_calib_task_calibrates_on_the_task_texts(glue_run):
    saved, allocation = glue_run
    assert saved["config"]["calib"] == "task"
    assert allocation.provenance["calibration"] == "glue:sst2 training texts"
    assert allocation.provenance["calibration_config"] is None


@pytest.mark.slow
def test_learning_rate_reaches_the_run(glue_run):
    saved, _ = glue_run
    assert saved["config"]["learning_rate"] == 3e-3


@pytest.mark.slow
def test_budget_parameters_keeps_within_uniform_lora(glue_run):
    saved, allocation = glue_run
    uniform = uniform_lora_parameters(allocation.shapes, 2)
    assert saved["parameters"]["lora"] == allocation.num_parameters <= uniform
    assert allocation.config.budget == "parameters" == saved["config"]["budget"]


class RecordOptimizer(TrainerCallback):
    """The model and the optimizer's (parameter names, learning rate) groups at the start."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.model = model
        self.groups = [
            ({names[id(p)] for p in group["params"]}, group["initial_lr"])
            for group in optimizer.param_groups
        ]


@pytest.mark.slow  # one epoch of SHORT
def test_pooling_and_head_learning_rate_shape_the_head_and_its_optimizer(
    folders,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    recorder = RecordOptimizer()
    monkeypatch.setitem(training.METHODS, "lora", WithCallback(training.METHODS["lora"], recorder))
    code, output, saved = train(
        "--method", "lora", "--task", f"csv:{folders / 'sentiment.csv'}", "--model",
        folders / "bert", "--pooling", "mean", "--learning-rate", 1e-3,
        "--head-learning-rate", 2e-2, *TINY, *SHORT, "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, output
    assert saved["config"]["pooling"] == "mean" and saved["config"]["head_learning_rate"] == 2e-2
    base = recorder.model.get_base_model()
    assert isinstance(base, PooledClassifier) and base.pooling == "mean"
    rates = {name: lr for names, lr in recorder.groups for name in names}
    head = {name for name in rates if is_head_parameter(name)}
    assert head and all(rates[name] == 2e-2 for name in head)
    assert all(lr == 1e-3 for name, lr in rates.items() if name not in head)
    assert any("lora_" in name for name in rates)


@pytest.mark.slow  # one epoch of SHORT
def test_method_frozen_trains_the_head_alone(folders, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    code, output, saved = train(
        "--method", "frozen", "--task", f"csv:{folders / 'sentiment.csv'}", "--model",
        folders / "bert", "--pooling", "mean", "--head-learning-rate", 1e-2, *TINY, *SHORT,
        "--out", out,
    )  # fmt: skip
    assert code == 0, output
    assert saved["ranks"] == {} and saved["parameters"]["lora"] == 0
    assert saved["parameters"]["trainable"] == 16 * 2 + 2  # the mean-pooled head: hidden x labels
    assert not (out / "allocation.json").exists()
    head = torch.load(out / "adapter" / "head.pt")
    assert head and all(is_head_parameter(name) for name in head)
    assert head["classifier.out_proj.weight"].shape == (2, 16)  # and the target buffers


NEW_METHODS = ("size-prior", "shuffled", "lora-matched", "senslora-fisher")


@pytest.fixture(scope="module")
def method_runs(folders, wide_bert, tmp_path_factory):  # noqa: F811
    """One epoch of each new method on the same model, task, calibration and seed; the size
    prior with calibration made to fail (it must not calibrate). The study's rows: the
    activation statistics on the calibration text, except senslora-fisher."""
    root = tmp_path_factory.mktemp("methods")

    def no_calibration(*args, **kwargs):
        raise AssertionError("the size prior must not calibrate")

    runs = {}
    for method in NEW_METHODS:
        with pytest.MonkeyPatch.context() as patch:
            if method == "size-prior":
                patch.setattr(sensitivity, "allocate_model", no_calibration)
            code, output, saved = train(
                "--method", method, "--task", f"csv:{folders / 'sentiment.csv'}", "--model",
                wide_bert, "--estimator", "activation", *TINY, *SHORT, "--out", root / method,
            )  # fmt: skip
        runs[method] = (code, output, saved, root / method)
    return runs


def finished(method_runs, method):
    code, output, saved, out = method_runs[method]
    assert code == 0, output
    assert saved["method"] == method and len(saved["epochs"]) == 1
    assert (out / "adapter" / "adapter_config.json").exists()
    return saved, out


@pytest.mark.slow  # the four runs of the fixture, one epoch of SHORT each
def test_size_prior_ranks_follow_the_matrix_sizes(method_runs):
    saved, out = finished(method_runs, "size-prior")
    allocation = load_allocation(out / "allocation.json")
    assert allocation.provenance["control"] == "size prior"
    assert saved["ranks"] == allocation.ranks
    assert allocation.config.budget == "parameters"  # the default: at most uniform LoRA's count
    assert 0.9 * allocation.uniform_parameters() <= allocation.num_parameters
    assert allocation.num_parameters <= allocation.uniform_parameters()
    by_size, sizes = {}, {}
    for name, (d_out, d_in) in allocation.shapes.items():
        by_size.setdefault(d_out * d_in, set()).add(allocation.ranks[name])
        sizes.setdefault(d_out * d_in, set()).add(name)
    assert len(by_size) == 2  # 16 x 16 and 16 x 96 / 96 x 16
    assert min(by_size[max(by_size)]) >= max(by_size[min(by_size)])
    large = [r for n, r in allocation.ranks.items() if n in sizes[max(by_size)]]
    small = [r for n, r in allocation.ranks.items() if n in sizes[min(by_size)]]
    assert sum(large) / len(large) > sum(small) / len(small)


@pytest.mark.slow
def test_shuffled_permutes_the_senslora_ranks_within_a_shape(method_runs):
    saved, out = finished(method_runs, "shuffled")
    allocation = load_allocation(out / "allocation.json")
    assert allocation.provenance["shuffle_seed"] == 0
    permutation = allocation.provenance["permutation"]
    assert any(source != name for name, source in permutation.items())
    assert all(allocation.shapes[s] == allocation.shapes[n] for n, s in permutation.items())
    assert saved["ranks"] == allocation.ranks
    assert allocation.num_parameters <= allocation.uniform_parameters()


@pytest.mark.slow
def test_lora_matched_is_uniform_at_the_parameter_count_of_senslora(method_runs):
    saved, out = finished(method_runs, "lora-matched")
    # the same model's shapes; the reference is senslora's equal-rank allocation, which on this
    # model trains more than uniform LoRA at the average rank
    shapes = load_allocation(method_runs["shuffled"][3] / "allocation.json").shapes
    matched = saved["method_report"]["matched_parameters"]
    assert matched > uniform_lora_parameters(shapes, 2)
    rank = matched_uniform_rank(shapes, matched)
    assert rank != 2 and saved["method_report"]["matched_rank"] == rank
    assert set(saved["ranks"].values()) == {rank}
    assert saved["parameters"]["lora"] == uniform_lora_parameters(shapes, rank)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == rank and adapter["lora_alpha"] == 2 * rank  # alpha/r of uniform LoRA
    assert not (out / "allocation.json").exists()


@pytest.mark.slow
def test_senslora_fisher_calibrates_on_the_labelled_task(method_runs):
    saved, out = finished(method_runs, "senslora-fisher")
    allocation = load_allocation(out / "allocation.json")
    assert allocation.provenance["estimator"] == "fisher"
    assert allocation.provenance["calibration"] == "the task's labelled training examples"
    assert allocation.provenance["num_sequences"] == 8  # --calib-samples labelled examples
    assert saved["ranks"] == allocation.ranks
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    ranks = {
        name.split(".lora_A")[0]: w.shape[0] for name, w in weights.items() if "lora_A" in name
    }
    assert sorted(ranks.values()) == sorted(allocation.ranks.values())


@pytest.mark.parametrize(
    "option, message",
    [
        (["--task", "glue:foo"], "unknown GLUE task 'foo'"),
        (["--method", "magic"], "method must be one of"),
        (["--pooling", "sideways"], "pooling must be one of"),
        (["--task", "glue:sst2", "--glue-dir", "missing"], "GLUE folder"),
        (["--train-limit", "0"], "train_limit"),
    ],
)
def test_a_bad_option_is_one_line_and_leaves_no_run_folder(
    folders,  # noqa: F811
    tmp_path,
    option,
    message,
):
    out = tmp_path / "run"
    option = [str(tmp_path / o) if o == "missing" else o for o in option]
    base = ["--task", f"csv:{folders / 'sentiment.csv'}", "--model", folders / "bert"]
    code, output, _ = train(*base, *TINY, *option, "--out", out)
    assert code == 2, output
    assert output.startswith("error: ") and message in output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert not out.exists()


def test_a_failure_during_training_leaves_no_run_folder(folders, tmp_path, monkeypatch):  # noqa: F811
    """The folder is made before training starts; an error before the first checkpoint
    removes it."""

    class FailFirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            assert (tmp_path / "run").is_dir()  # made by then
            raise ValueError("the first step failed")

    monkeypatch.setitem(
        training.METHODS, "lora", WithCallback(training.METHODS["lora"], FailFirstStep())
    )
    base = ["--method", "lora", "--task", f"csv:{folders / 'sentiment.csv'}"]
    code, output, _ = train(*base, "--model", folders / "bert", *TINY, "--out", tmp_path / "run")
    assert code == 2 and output.strip() == "error: the first step failed"
    assert not (tmp_path / "run").exists()
