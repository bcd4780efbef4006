"""A SEQ_CLS adapter written by a training run (senslora ranks, the classifier head in
modules_to_save), reloaded onto the base model, reproduces the trained model's logits."""

from __future__ import annotations

import json
import random

import peft
import pytest
import torch
from conftest import save_tiny_bert_with_minilm_tokenizer
from transformers import AutoTokenizer

from senslora.finetune.config import TrainConfig
from senslora.finetune.heads import load_classifier
from senslora.finetune.training import run_training

WORDS = ["film", "story", "actor", "scene", "plot", "music", "ending", "cast"]
SENTENCES = ["great film story", "awful plot cast music"]


@pytest.fixture(scope="module")
def bert_and_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("round-trip")
    save_tiny_bert_with_minilm_tokenizer(root / "bert")
    rng = random.Random(0)
    for split, n in (("", 48), (".dev", 16)):
        rows = ["text,label"]
        for i in range(n):
            # dev: 12 positives of 16, so that no prediction rule scores the same as its flip
            label = int(i % 4 != 0) if split else rng.randint(0, 1)
            words = [*rng.sample(WORDS, 4), "great" if label else "awful"]
            rows.append(f"{' '.join(words)},{label}")
        (root / f"sentiment{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(bert_and_task, tmp_path_factory):
    """One senslora training run: (its folder, its results, the logits of the trained model on
    SENTENCES, taken when it saved its final adapter)."""
    root, out = bert_and_task, tmp_path_factory.mktemp("run")
    tokenizer = AutoTokenizer.from_pretrained(root / "bert")
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    logits = []
    save = peft.PeftModel.save_pretrained

    def logits_then_save(self, *args, **kwargs):  # the last call saves the final adapter
        was_training = self.training
        self.eval()
        with torch.no_grad():
            logits.append(self(**batch).logits.clone())
        self.train(was_training)
        return save(self, *args, **kwargs)

    config = TrainConfig(
        method="senslora",
        task=f"csv:{root / 'sentiment.csv'}",
        model=str(root / "bert"),
        avg_rank=2,
        epochs=1,
        batch_size=16,
        learning_rate=5e-2,
        calib_samples=8,
        calib_seq_len=16,
        device="cpu",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peft.PeftModel, "save_pretrained", logits_then_save)
        results = run_training(config, out, progress=False)
    return out, results, logits[-1]


def reloaded_model(root, adapter):
    """The default head (pooling "auto") on a fresh backbone, then the saved adapter and head."""
    base = load_classifier(str(root / "bert"), 2)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def predict(model, tokenizer, texts):
    with torch.no_grad():
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        return model(**batch).logits


@pytest.mark.slow  # one epoch of training: about 11 s
def test_trained_seq_cls_adapter_reloads_with_its_logits(bert_and_task, trained):
    root, (out, _, expected) = bert_and_task, trained
    adapter = out / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS"
    assert "classifier" in (saved["modules_to_save"] or [])
    allocation = json.loads((out / "allocation.json").read_text())
    ranks = {k.strip("^$").replace("\\", ""): r for k, r in saved["rank_pattern"].items()}
    prefix = allocation["backbone"] + "."  # the keys are relative to the backbone ("bert")
    assert allocation["backbone"] == "bert"
    assert ranks == {n.removeprefix(prefix): r for n, r in allocation["ranks"].items() if r > 0}

    tokenizer = AutoTokenizer.from_pretrained(root / "bert")
    untrained = predict(load_classifier(str(root / "bert"), 2), tokenizer, SENTENCES)
    reloaded = reloaded_model(root, adapter)
    logits = predict(reloaded, tokenizer, SENTENCES)
    assert not torch.allclose(logits, untrained, atol=1e-4)  # training changed something
    torch.testing.assert_close(logits, expected)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(
        predict(merged, tokenizer, SENTENCES), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow  # shares the training run above
def test_reported_accuracy_is_the_saved_adapters_accuracy(bert_and_task, trained):
    """results.json's last-epoch accuracy equals the accuracy of the saved adapter on the dev
    file, recomputed here (not only a number between 0 and 1)."""
    root, (out, results, _) = bert_and_task, trained
    rows = (root / "sentiment.dev.csv").read_text().splitlines()[1:]
    texts = [row.rsplit(",", 1)[0] for row in rows]
    labels = torch.tensor([int(row.rsplit(",", 1)[1]) for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(root / "bert")
    predictions = predict(reloaded_model(root, out / "adapter"), tokenizer, texts).argmax(-1)
    accuracy = (predictions == labels).float().mean().item()
    assert results["main_metric"] == "accuracy"
    assert results["epochs"][-1]["accuracy"] == pytest.approx(accuracy)
    saved = json.loads((out / "results.json").read_text())
    assert saved["epochs"][-1]["accuracy"] == pytest.approx(accuracy)
