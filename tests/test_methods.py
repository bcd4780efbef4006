"""The controls of the equal-parameter study as fine-tuning methods: what each one injects."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_batches

from senslora.controls import matched_uniform_rank
from senslora.finetune.config import TrainConfig
from senslora.finetune.methods import METHODS, prepare_model
from senslora.peft_bridge import injected_ranks


def prepared(method: str, seed: int = 0, **options):
    config = TrainConfig(method=method, avg_rank=3, seed=seed, **options)
    return prepare_model(
        tiny_bert(),
        config,
        task_type="SEQ_CLS",
        calibration_batches=lambda: token_batches(num_batches=2, batch=4, length=9),
        train_batches=lambda: token_batches(labels=True),
        labelled_batches=lambda: token_batches(num_batches=2, batch=4, length=9, labels=True),
        total_steps=10,
    )


def lora_parameters(result) -> int:
    return sum(p.numel() for n, p in result.model.named_parameters() if "lora_" in n)


def shape_profile(allocation) -> Counter:
    return Counter((allocation.shapes[n], r) for n, r in allocation.ranks.items())


def test_every_method_is_registered_once_by_its_name():
    assert all(method.name == name for name, method in METHODS.items())
    for name in ("lora-matched", "size-prior", "shuffled", "senslora-fisher"):
        assert name in METHODS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_keeps_the_parameter_count_and_shape_profile(seed):
    budget = {"budget": "parameters"}
    original = prepared("senslora", seed=seed, **budget)
    shuffled = prepared("shuffled", seed=seed, **budget)
    assert lora_parameters(shuffled) == lora_parameters(original)
    assert shape_profile(shuffled.allocation) == shape_profile(original.allocation)
    assert injected_ranks(shuffled.model) == shuffled.allocation.ranks
    assert shuffled.allocation.provenance["shuffle_seed"] == seed
    assert shuffled.allocation.ranks != original.allocation.ranks  # it permutes


def test_size_prior_needs_no_calibration_pass():
    def no_data():
        raise AssertionError("the size prior must not read calibration data")

    config = TrainConfig(method="size-prior", avg_rank=3, budget="parameters")
    result = prepare_model(
        tiny_bert(),
        config,
        task_type="SEQ_CLS",
        calibration_batches=no_data,
        train_batches=no_data,
        labelled_batches=no_data,
        total_steps=10,
    )
    uniform = prepared("lora")
    assert lora_parameters(result) <= lora_parameters(uniform)
    ranks = result.allocation.ranks
    sizes = {n: d_out * d_in for n, (d_out, d_in) in result.allocation.shapes.items()}
    largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    assert ranks[largest] > ranks[smallest]  # ranks follow the size alone


def test_lora_matched_is_uniform_at_the_closest_parameter_count():
    reference = prepared("senslora", budget="rank").allocation
    result = prepared("lora-matched")
    rank = matched_uniform_rank(reference.shapes, reference.num_parameters)
    assert set(injected_ranks(result.model).values()) == {rank}
    assert result.report == {
        "matched_rank": rank,
        "matched_parameters": reference.num_parameters,
    }
    alphas = {m.lora_alpha["default"] for m in result.model.modules() if hasattr(m, "lora_alpha")}
    assert alphas == {2.0 * 3 * rank / 3}  # alpha/r of uniform LoRA at the average rank


def test_senslora_fisher_calibrates_on_the_labelled_examples():
    result = prepared("senslora-fisher", budget="parameters")
    provenance = result.allocation.provenance
    assert provenance["estimator"] == "fisher"
    assert provenance["calibration"] == "the task's labelled training examples"
    assert provenance["num_sequences"] == 8
    activation = prepared("senslora", budget="parameters", estimator="activation").allocation
    assert activation.provenance["estimator"] == "activation"
    thetas = [m["theta"] for m in result.allocation.metrics.values()]
    assert thetas != [m["theta"] for m in activation.metrics.values()]


def test_auto_reads_the_task_fisher_on_a_classifier_unless_the_activation_is_needed():
    fisher = prepared("senslora-fisher").allocation
    default = prepared("senslora").allocation  # estimator 'auto'
    assert default.provenance["estimator"] == "fisher"
    assert default.provenance["calibration"] == "the task's labelled training examples"
    assert default.ranks == fisher.ranks
    assert [m["theta"] for m in default.metrics.values()] == [
        m["theta"] for m in fisher.metrics.values()
    ]
    # what only the activation statistics give keeps auto on them, on the calibration text
    for method, options in (
        ("senslora-inverse", {}),
        ("senslora", {"skip_positions": 1}),
        ("senslora", {"outlier_factor": 10.0}),
    ):
        allocation = prepared(method, **options).allocation
        assert allocation.provenance["estimator"] == "activation", (method, options)
        assert allocation.provenance["calibration"] != "the task's labelled training examples"


def test_token_filters_reach_the_statistics_and_the_provenance():
    plain = prepared("senslora").allocation
    filtered = prepared("senslora", skip_positions=2).allocation
    assert filtered.provenance["token_filters"] == {"skip_positions": 2, "outlier_factor": None}
    assert plain.provenance["token_filters"]["skip_positions"] == 0
    traces = [m["trace"] for m in filtered.metrics.values()]
    assert traces != [m["trace"] for m in plain.metrics.values()]
    with pytest.raises(ValueError, match="skip_positions must be an integer >= 0"):
        TrainConfig(skip_positions=-1)
    with pytest.raises(ValueError, match="outlier_factor must be > 1"):
        TrainConfig(outlier_factor=0.5)


def test_frozen_encoder_trains_the_head_alone(tmp_path):
    result = prepared("frozen")
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    assert not any("lora_" in n for n, _ in result.model.named_parameters())
    METHODS["frozen"].save(result, tmp_path / "adapter")
    head = torch.load(tmp_path / "adapter" / "head.pt")
    assert set(head) == {"classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match="needs a classification task"):
        prepare_model(
            tiny_bert(),
            TrainConfig(method="frozen"),
            task_type="CAUSAL_LM",
            calibration_batches=list,
            train_batches=list,
            total_steps=1,
        )


def test_senslora_inverse_reads_the_inverse_curvature():
    result = prepared("senslora-inverse", budget="parameters")
    assert result.allocation.config.curvature == "inverse"
    default = prepared("senslora", budget="parameters").allocation
    traces = [m["trace"] for m in result.allocation.metrics.values()]
    assert traces != [m["trace"] for m in default.metrics.values()]


def test_auto_on_a_causal_lm_stays_the_next_token_fisher_on_the_calibration_text():
    def no_labels():
        raise AssertionError("a causal LM's auto must not read the labelled examples")

    result = prepare_model(
        tiny_llama(),
        TrainConfig(method="senslora", avg_rank=3),
        task_type="CAUSAL_LM",
        calibration_batches=lambda: token_batches(num_batches=2, batch=2, length=9),
        train_batches=no_labels,
        labelled_batches=no_labels,
        total_steps=10,
    )
    assert result.allocation.provenance["estimator"] == "fisher"


def test_auto_on_a_classifier_says_that_an_explicit_calibration_is_not_read(caplog):
    with caplog.at_level("WARNING", logger="senslora.finetune.methods"):
        allocation = prepared("senslora", calib="rotten_tomatoes").allocation
    assert allocation.provenance["estimator"] == "fisher"
    assert "calib='rotten_tomatoes' is not read" in caplog.text
    assert "estimator='activation'" in caplog.text


def test_auto_on_a_classifier_without_labelled_batches_says_what_to_pass():
    with pytest.raises(ValueError, match="no labelled batches were given"):
        prepare_model(
            tiny_bert(),
            TrainConfig(method="senslora", avg_rank=3),
            task_type="SEQ_CLS",
            calibration_batches=lambda: token_batches(num_batches=2, batch=4, length=9),
            train_batches=list,
            total_steps=10,
        )
