"""Heads that fit the encoder (senslora.finetune.heads) and the frozen probe (finetune.probe)."""

from __future__ import annotations

import json
import random

import numpy as np
import peft
import pytest
import torch
from transformers import BertConfig, BertModel

from senslora.finetune.config import TrainConfig
from senslora.finetune.heads import (
    PooledClassifier,
    TargetStats,
    fit_target_stats,
    is_head_parameter,
    load_classifier,
    optimizer_groups,
    pool,
    read_pooling,
)
from senslora.finetune.probe import fit_logistic, fit_ridge, frozen_probe
from senslora.finetune.tasks import ClassificationTask, Example

CONFIG = dict(
    vocab_size=100,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def classifier(num_labels=2, pooling="mean", head_seed=1, targets=None, **config):
    """Backbone weights from seed 0, head weights from ``head_seed``."""
    torch.manual_seed(0)
    backbone = BertModel(BertConfig(**{**CONFIG, **config}))
    torch.manual_seed(head_seed)
    return PooledClassifier(backbone, num_labels, pooling, targets=targets).eval()


def padded_batch():
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ----------------------------------------------------------------------------- read_pooling


def write_st_pooling(folder, modes, sub="1_Pooling", modules=True):
    (folder / sub).mkdir(parents=True)
    keys = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
    config = {f"pooling_mode_{k}": k in modes for k in keys}
    (folder / sub / "config.json").write_text(json.dumps(config))
    if modules:
        entry = {"idx": 1, "name": "1", "path": sub, "type": "sentence_transformers.models.Pooling"}
        (folder / "modules.json").write_text(json.dumps([entry]))


def test_read_pooling_from_sentence_transformers_folder(tmp_path):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path)  # has pooler weights
    write_st_pooling(tmp_path, {"cls_token"}, sub="custom_pool")
    assert read_pooling(tmp_path) == "cls"  # the ST config wins over the pooler weights


def test_read_pooling_default_folder_without_modules_json(tmp_path):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path)
    write_st_pooling(tmp_path, {"mean_tokens"}, modules=False)
    assert read_pooling(tmp_path) == "mean"


def test_read_pooling_rejects_several_modes(tmp_path):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path)
    write_st_pooling(tmp_path, {"mean_tokens", "max_tokens"})
    with pytest.raises(ValueError, match="exactly one"):
        read_pooling(tmp_path)


def test_read_pooling_falls_back_to_pooler_weights_then_mean(tmp_path):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path / "with")
    BertModel(BertConfig(**CONFIG), add_pooling_layer=False).save_pretrained(tmp_path / "without")
    assert read_pooling(tmp_path / "with") == "pooler"
    assert read_pooling(tmp_path / "without") == "mean"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pooling(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_pooling(tmp_path / "empty")


# ----------------------------------------------------------------------------- pooling


def test_poolings_equal_hand_computation_with_padding():
    hidden = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(1))
    _, mask = padded_batch()
    lengths = mask.sum(dim=1).tolist()
    for row, n in enumerate(lengths):
        real = hidden[row, :n]
        torch.testing.assert_close(pool(hidden, mask, "mean")[row], real.mean(dim=0))
        torch.testing.assert_close(pool(hidden, mask, "max")[row], real.max(dim=0).values)
        torch.testing.assert_close(pool(hidden, mask, "last")[row], real[-1])
        torch.testing.assert_close(
            pool(hidden, mask, "mean_sqrt_len")[row], real.sum(dim=0) / n**0.5
        )
        torch.testing.assert_close(pool(hidden, mask, "cls")[row], real[0])
    flipped = pool(hidden.flip(1), mask.flip(1), "last")  # left padding
    torch.testing.assert_close(flipped, torch.stack([hidden[r, 0] for r in range(3)]))


def test_mean_pooled_embedding_ignores_padding():
    """A sentence padded inside a batch gets the embedding it has alone."""
    model = classifier()
    ids, mask = padded_batch()
    batched = model.pooled(input_ids=ids, attention_mask=mask)
    alone = model.pooled(input_ids=ids[1:2, :4], attention_mask=mask[1:2, :4])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-6, rtol=1e-5)


def test_pooler_pooling_is_berts_pooler_output():
    model = classifier(pooling="pooler")
    ids, mask = padded_batch()
    expected = model.bert(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(model.pooled(input_ids=ids, attention_mask=mask), expected)


def test_bad_pooling_and_labels_are_rejected():
    with pytest.raises(ValueError, match="pooling must be one of"):
        classifier(pooling="avg")
    with pytest.raises(ValueError, match="num_labels"):
        classifier(num_labels=0)
    with pytest.raises(ValueError, match="needs a backbone with a pooler"):
        torch.manual_seed(0)
        backbone = BertModel(BertConfig(**CONFIG), add_pooling_layer=False)
        PooledClassifier(backbone, 2, "pooler")


# ----------------------------------------------------------------------------- losses


def test_cross_entropy_loss_and_module_names():
    model = classifier(num_labels=3)
    ids, mask = padded_batch()
    labels = torch.tensor([0, 2, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    names = dict(model.named_modules())
    assert "bert.encoder.layer.0.attention.self.query" in names  # as in BertForSequenceClassif.
    assert "classifier" in names


def test_regression_loss_is_on_standardised_targets_and_logits_in_task_units():
    stats = TargetStats(mean=2.5, std=1.5)
    model = classifier(num_labels=1, targets=stats)
    plain = classifier(num_labels=1)  # the same weights, no statistics
    ids, mask = padded_batch()
    labels = torch.tensor([0.0, 2.0, 5.0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    raw = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, raw * 1.5 + 2.5)
    expected = torch.nn.functional.mse_loss(raw.squeeze(-1), (labels - 2.5) / 1.5)
    torch.testing.assert_close(out.loss, expected)


def test_fit_target_stats():
    stats = fit_target_stats([1.0, 2.0, 3.0, 4.0])
    assert stats.mean == pytest.approx(2.5)
    assert stats.std == pytest.approx(np.std([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(
        stats.restore(stats.standardize(torch.tensor([7.0]))), torch.tensor([7.0])
    )
    with pytest.raises(ValueError, match="vary"):
        fit_target_stats([3.0, 3.0])
    with pytest.raises(ValueError, match="std > 0"):
        TargetStats(0.0, 0.0)


# ----------------------------------------------------------------------------- peft


def peft_classifier(num_labels=2, targets=None, head_seed=1):
    model = classifier(num_labels=num_labels, targets=targets, head_seed=head_seed)
    lora = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    return peft.get_peft_model(model, lora)


@pytest.mark.parametrize("num_labels, targets", [(3, None), (1, TargetStats(2.5, 1.5))])
def test_peft_save_reload_gives_identical_logits(tmp_path, num_labels, targets):
    model = peft_classifier(num_labels, targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save" in n for n in trainable)  # the head trains
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # as after training: B != 0, head moved
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.eval()
    ids, mask = padded_batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    fresh = classifier(num_labels=num_labels, head_seed=7)  # another head, no statistics
    assert not torch.allclose(fresh(input_ids=ids, attention_mask=mask).logits, before)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, before)


def test_optimizer_groups_partition_the_trainable_parameters():
    model = peft_classifier()
    layer_norm = model.base_model.model.bert.encoder.layer[0].output.LayerNorm
    layer_norm.weight.requires_grad_(True)  # a trainable norm: no weight decay
    groups = optimizer_groups(model, lr=1e-3, head_lr=2e-2, weight_decay=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter exactly once
    for group in groups:
        names = [trainable[id(p)] for p in group["params"]]
        heads = {is_head_parameter(n) for n in names}
        assert len(heads) == 1
        assert group["lr"] == (2e-2 if heads.pop() else 1e-3)
        no_decay = {n.endswith("bias") or "LayerNorm" in n for n in names}
        assert no_decay == {group["weight_decay"] == 0.0}
    head = {n for n in trainable.values() if is_head_parameter(n)}
    assert head == {n for n in trainable.values() if "classifier" in n}
    assert len(groups) == 4  # head / adapters x decay / none
    torch.optim.AdamW(groups)  # a valid AdamW argument
    with pytest.raises(ValueError, match="head_lr must be > 0"):
        optimizer_groups(model, lr=1e-3, head_lr=0.0, weight_decay=0.0)


# ----------------------------------------------------------------------------- probe


def test_fit_logistic_separates_a_separable_toy_task_at_its_optimum():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    score = x[:, 0] - 2 * x[:, 3]
    x, y = x[score.abs() > 0.5], (score[score.abs() > 0.5] > 0).long()  # a margin
    weight, bias = fit_logistic(x[:150], y[:150], 2, l2=1e-3)
    assert ((x @ weight + bias).argmax(dim=1) == y).all()  # training and held-out points
    weight.requires_grad_(True), bias.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x[:150] @ weight + bias, y[:150])
    (loss + 0.5e-3 * weight.pow(2).sum()).backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5  # a stationary point


def test_fit_ridge_equals_least_squares_and_shrinks():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 3.0
    weight, bias = fit_ridge(x, y, l2=0.0)
    design = np.hstack([x.numpy(), np.ones((50, 1))])
    exact = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(weight.squeeze(1).numpy(), exact[:4], atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), exact[4:], atol=1e-10)
    shrunk, _ = fit_ridge(x, y, l2=10.0)
    assert shrunk.norm() < weight.norm()


def toy_task(rng, n):
    """'good' sentences are class 1, 'bad' ones class 0, with random filler words."""
    filler = ["the", "a", "movie", "was", "it", "plot", "and", "very", "quite", "actors"]
    examples = []
    for i in range(n):
        label = i % 2
        words = rng.sample(filler, 4) + ["good" if label else "bad"] * 3
        rng.shuffle(words)
        examples.append(Example(" ".join(words), None, label))
    return tuple(examples)


def test_frozen_probe_learns_a_separable_toy_task(tmp_path):
    from conftest import save_tiny_bert_with_minilm_tokenizer

    folder = save_tiny_bert_with_minilm_tokenizer(tmp_path / "model")
    rng = random.Random(0)
    task = ClassificationTask(
        name="toy",
        train=toy_task(rng, 60),
        dev={"dev": toy_task(rng, 30)},
        num_labels=2,
        metrics=("accuracy",),
        main_metric="accuracy",
        label_names=None,
    )
    result = frozen_probe(task, str(folder), pooling="mean")
    assert result["dev"]["dev"]["accuracy"] >= 0.9  # majority class: 0.5
    assert result["pooling"] == "mean" and result["l2"] > 0


# ----------------------------------------------------------------------------- config


def test_train_config_head_fields():
    assert TrainConfig(head_learning_rate=3e-3).head_learning_rate == 3e-3
    with pytest.raises(ValueError, match="head_learning_rate must be > 0"):
        TrainConfig(head_learning_rate=0.0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        TrainConfig(pooling="average")
    with pytest.raises(ValueError, match="standardize_targets must be a bool"):
        TrainConfig(standardize_targets="yes")


# ----------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_minilm_reads_mean_pooling_and_embeds_paraphrases_closer():
    from senslora.data.assets import minilm_path

    try:
        path = minilm_path()
    except FileNotFoundError:
        pytest.skip("the MiniLM package is not installed (make setup)")
    assert read_pooling(path) == "mean"
    model = load_classifier(str(path), 2)
    assert model.pooling == "mean"
    from senslora.models import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        u = torch.nn.functional.normalize(model.pooled(**batch), dim=1)
    assert u[0] @ u[1] > u[0] @ u[2] + 0.3
