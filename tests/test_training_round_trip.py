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
from senslora.finetune.training import run_training
from senslora.models import load_model

WORDS = ["film", "story", "actor", "scene", "plot", "music", "ending", "cast"]


@pytest.fixture(scope="module")
def bert_and_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("round-trip")
    save_tiny_bert_with_minilm_tokenizer(root / "bert")
    rng = random.Random(0)
    for split, n in (("", 48), (".dev", 16)):
        rows = ["text,label"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = [*rng.sample(WORDS, 4), "great" if label else "awful"]
            rows.append(f"{' '.join(words)},{label}")
        (root / f"sentiment{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow  # one epoch of training: about 11 s
def test_trained_seq_cls_adapter_reloads_with_its_logits(bert_and_task, tmp_path, monkeypatch):
    root = bert_and_task
    tokenizer = AutoTokenizer.from_pretrained(root / "bert")
    batch = dict(
        tokenizer(["great film story", "awful plot cast music"], padding=True, return_tensors="pt")
    )
    trained = []
    save = peft.PeftModel.save_pretrained

    def logits_then_save(self, *args, **kwargs):  # the last call saves the final adapter
        was_training = self.training
        self.eval()
        with torch.no_grad():
            trained.append(self(**batch).logits.clone())
        self.train(was_training)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", logits_then_save)
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
    run_training(config, tmp_path, progress=False)
    monkeypatch.undo()
    adapter = tmp_path / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS"
    assert "classifier" in (saved["modules_to_save"] or [])
    allocation = json.loads((tmp_path / "allocation.json").read_text())
    ranks = {k.strip("^$").replace("\\", ""): r for k, r in saved["rank_pattern"].items()}
    assert ranks == {n: r for n, r in allocation["ranks"].items() if r > 0}

    base = load_model(str(root / "bert"), task="sequence-classification", device="cpu")
    with torch.no_grad():
        untrained = base(**batch).logits.clone()
    reloaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        logits = reloaded(**batch).logits
    assert not torch.allclose(logits, untrained, atol=1e-4)  # training changed something
    torch.testing.assert_close(logits, trained[-1])
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained[-1], rtol=1e-4, atol=1e-5)
