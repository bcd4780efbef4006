"""Every `senslora allocate` option that shapes the result, through the command line: the value
lands where it should in allocation.json and adapter_config.json, and it changes what it should."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import save_tiny_bert_with_minilm_tokenizer
from typer.testing import CliRunner

from senslora.peft_bridge import suffix_key

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert_with_minilm_tokenizer(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    words = "rank budget matrix curvature adapter sensitivity trace column token layer".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) for i in range(24)]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def run(model_dir, calib, tmp_path_factory):
    """``run(*options) -> (allocation.json, adapter_config.json)`` of one allocate call; the
    same options are computed once per module."""
    done = {}

    def invoke(*options):
        if options not in done:
            out = tmp_path_factory.mktemp("out")
            args = ["allocate", "--model", model_dir, "--calib", calib, "--out", out]
            args += ["--num-samples", 12, "--seq-len", 16, "--batch-size", 4, *options]
            from senslora.cli import app

            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output
            done[options] = tuple(
                json.loads((out / name).read_text())
                for name in ("allocation.json", "adapter_config.json")
            )
        return done[options]

    return invoke


def metric(document, key):
    return np.array([m[key] for m in document["modules"].values()])


def test_defaults(run):
    document, adapter = run()
    assert document["config"]["avg_rank"] == 4 and adapter["r"] == 4
    assert sum(document["ranks"].values()) == 4 * len(document["ranks"]) == 4 * 12
    assert adapter["lora_alpha"] == 8
    assert document["provenance"]["calibration_config"]["num_samples"] == 12


def test_avg_rank_and_seed(run):
    document, adapter = run("--avg-rank", 2, "--seed", 3)
    assert document["config"]["avg_rank"] == 2 and adapter["r"] == 2
    assert sum(document["ranks"].values()) == 2 * 12
    assert document["provenance"]["calibration_config"]["seed"] == 3


def test_budget_parameters(run):
    document, _ = run("--budget", "parameters")
    assert document["config"]["budget"] == "parameters"
    shapes = {n: m["shape"] for n, m in document["modules"].items()}
    spent = sum(r * sum(shapes[n]) for n, r in document["ranks"].items())
    uniform = sum(4 * sum(s) for s in shapes.values())
    assert uniform - min(sum(s) for s in shapes.values()) < spent <= uniform


@pytest.mark.parametrize("score", ["global", "topk", "effective_rank"])
def test_score_picks_theta(run, score):
    document, _ = run("--score", score)
    assert document["config"]["score"] == score
    source = {"global": "trace", "topk": "top_k_mean", "effective_rank": "effective_rank"}[score]
    np.testing.assert_allclose(metric(document, "theta"), metric(document, source), rtol=1e-12)


def test_weighting_equal(run):
    document, _ = run("--weighting", "equal")
    assert document["config"]["weighting"] == "equal"
    weights = document["weights"]
    assert weights["beta1"] == pytest.approx(0.5 / metric(document, "top_k_mean").mean())
    assert weights["gamma1"] == pytest.approx(0.5 / metric(document, "trace").mean())
    default, _ = run()
    assert default["weights"]["beta1"] != pytest.approx(weights["beta1"])


def test_top_k_fraction_and_effective_rank_threshold(run):
    document, _ = run("--top-k-fraction", 1.0, "--effective-rank-threshold", 0.5)
    default, _ = run()
    assert document["config"]["top_k_fraction"] == 1.0
    assert document["config"]["effective_rank_threshold"] == 0.5
    # k = N: the Top-k mean is the mean of all N entries, trace / N
    numbers = np.array([math.prod(m["shape"]) for m in document["modules"].values()])
    np.testing.assert_allclose(metric(document, "top_k_mean"), metric(document, "trace") / numbers)
    assert (metric(document, "effective_rank") <= metric(default, "effective_rank")).all()
    assert (metric(document, "effective_rank") < metric(default, "effective_rank")).any()


def test_spectrum_eigenvalues(run):
    document, _ = run("--spectrum", "eigenvalues")
    default, _ = run()
    assert document["config"]["spectrum"] == "eigenvalues"
    np.testing.assert_array_equal(metric(document, "trace"), metric(default, "trace"))
    assert (metric(document, "effective_rank") != metric(default, "effective_rank")).any()


def test_scheme_pra(run):
    document, _ = run("--scheme", "pra")
    assert document["config"]["scheme"] == "pra"
    assert sorted(set(document["ranks"].values())) == [3, 4, 5]
    theta = {n: m["theta"] for n, m in document["modules"].items()}
    best = max(theta, key=theta.get)
    assert document["ranks"][best] == 5


def test_min_and_max_rank(run):
    document, adapter = run("--min-rank", 0, "--max-rank", 5)
    assert (document["config"]["min_rank"], document["config"]["max_rank"]) == (0, 5)
    assert max(document["ranks"].values()) <= 5
    assert sum(document["ranks"].values()) == 4 * 12
    kept = {relative(n) for n, r in document["ranks"].items() if r > 0}
    assert set(adapter["target_modules"]) == kept


def test_targets_list(run):
    document, adapter = run("--targets", "query,value")
    assert len(document["ranks"]) == 4
    assert all(n.endswith((".query", ".value")) for n in document["ranks"])
    assert document["provenance"]["targets"] == ["query", "value"]
    assert set(adapter["target_modules"]) == {relative(n) for n in document["ranks"]}


@pytest.mark.parametrize("policy", ["scale", "rslora", "constant"])
def test_alpha_policy_and_lora_alpha(run, policy):
    document, adapter = run("--alpha-policy", policy, "--lora-alpha", 6)
    ranks = document["ranks"]
    assert adapter["lora_alpha"] == 6
    assert adapter["use_rslora"] is (policy == "rslora")
    if policy == "scale":
        expected = {n: 6 * r / 4 for n, r in ranks.items()}
    else:
        expected = {n: 6.0 for n in ranks}
    assert document["alphas"] == pytest.approx(expected)
    assert adapter["alpha_pattern"] == pytest.approx(
        {suffix_key(relative(n)): a for n, a in expected.items()}
    )
    assert adapter["rank_pattern"] == {suffix_key(relative(n)): r for n, r in ranks.items()}
    assert len(set(ranks.values())) > 1  # else every policy would give the same alphas


@pytest.mark.parametrize("policy", ["scale", "rslora"])
def test_cli_adapter_config_builds_the_allocated_model(run, model_dir, tmp_path, policy):
    """The adapter_config.json the CLI writes, loaded by peft onto the model, gives every module
    its allocated rank and the scaling of its alpha_pattern entry."""
    import peft
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForSequenceClassification

    document, adapter = run("--alpha-policy", policy, "--lora-alpha", 6)
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter))
    config = peft.LoraConfig.from_pretrained(tmp_path)
    model = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(model_dir), config
    )
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert {n: m.r["default"] for n, m in layers.items()} == document["ranks"]
    for name, layer in layers.items():
        rank, alpha = document["ranks"][name], document["alphas"][name]
        divisor = math.sqrt(rank) if policy == "rslora" else rank
        assert layer.scaling["default"] == pytest.approx(alpha / divisor), name


def relative(name: str) -> str:
    """A module name relative to the backbone, as the portable LoraConfig keys are."""
    return name.removeprefix("bert.")
