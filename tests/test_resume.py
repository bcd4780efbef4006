"""An interrupted `run_training` resumes from its checkpoint and its allocation.json: the
allocation is read back, not recomputed, and the run ends where an uninterrupted one ends."""

from __future__ import annotations

import json

import pytest
import torch
from method_hooks import WithCallback
from safetensors.torch import load_file
from test_training import folders  # noqa: F401  (fixture: tiny model folders and task files)
from transformers import TrainerCallback

from senslora.finetune import training
from senslora.finetune.config import TrainConfig
from senslora.finetune.methods import sensitivity


class Interrupted(Exception):
    """Stands for a killed process."""


class InterruptAfterFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise Interrupted(f"stopped after the checkpoint of step {state.global_step}")


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def short_config(root, method: str, **options) -> TrainConfig:
    """Two epochs of 3 steps (48 examples in batches of 16) on the tiny BERT."""
    defaults = dict(
        task=f"csv:{root / 'sentiment.csv'}",
        model=str(root / "bert"),
        avg_rank=2,
        epochs=2,
        batch_size=16,
        learning_rate=5e-3,
        train_limit=48,
        calib_samples=8,
        calib_seq_len=16,
        device="cpu",
        max_length=32,
    )
    return TrainConfig(method=method, **{**defaults, **options})


def adapter_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # three runs of 3 or 6 steps (see SHORT in test_cli_train.py)
def test_an_interrupted_run_resumes_with_its_allocation_and_ends_like_an_uninterrupted_one(
    folders,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    config = short_config(folders, "senslora")
    whole = training.run_training(config, tmp_path / "whole", progress=False)
    assert whole["resumed"] is False

    run_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupting = WithCallback(training.METHODS["senslora"], InterruptAfterFirstCheckpoint())
        patch.setitem(training.METHODS, "senslora", interrupting)
        with pytest.raises(Interrupted, match="step 3"):
            training.run_training(config, run_dir, progress=False)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-3"]
    assert not (run_dir / "results.json").exists()
    saved_allocation = (run_dir / "allocation.json").read_text()

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must reuse allocation.json, not calibrate again")

    monkeypatch.setattr(sensitivity, "allocate_model", no_calibration)
    counter = CountSteps()
    monkeypatch.setitem(
        training.METHODS, "senslora", WithCallback(training.METHODS["senslora"], counter)
    )
    resumed = training.run_training(config, run_dir, progress=False)

    assert counter.steps == [4, 5, 6]  # the second epoch only: 48 examples in batches of 16
    assert resumed["resumed"] is True
    assert json.loads((run_dir / "results.json").read_text())["resumed"] is True
    assert (run_dir / "allocation.json").read_text() == saved_allocation
    assert resumed["ranks"] == whole["ranks"]
    assert not (run_dir / "checkpoints").exists()
    assert resumed["train_losses"] == pytest.approx(whole["train_losses"], abs=1e-6)
    assert [e["epoch"] for e in resumed["epochs"]] == [1.0, 2.0]
    for mine, reference in zip(resumed["epochs"], whole["epochs"], strict=True):
        assert mine == pytest.approx(reference, abs=1e-6)
    reference_weights = adapter_weights(tmp_path / "whole")
    weights = adapter_weights(run_dir)
    assert sorted(weights) == sorted(reference_weights)
    for name, weight in reference_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=1e-6)


class RecordSaves(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_save(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_adalora_saves_no_checkpoint_and_restarts_over_an_old_one(
    folders,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """peft saves AdaLoRA cut to its rank pattern, which the initial-rank model cannot load: an
    AdaLoRA run keeps no checkpoint, and one left by an older version is cleared, not loaded."""
    run_dir = tmp_path / "adalora"
    old = run_dir / "checkpoints" / "checkpoint-6"
    old.mkdir(parents=True)
    (old / "adapter_config.json").write_text("{}\n")
    saves = RecordSaves()
    monkeypatch.setitem(
        training.METHODS, "adalora", WithCallback(training.METHODS["adalora"], saves)
    )
    config = short_config(folders, "adalora", train_limit=None)  # 96 examples: 6 steps
    with caplog.at_level("WARNING", logger="senslora"):
        results = training.run_training(config, run_dir, progress=False)

    assert results["resumed"] is False
    assert [e["epoch"] for e in results["epochs"]] == [1.0, 2.0]
    assert saves.steps == []
    assert not (run_dir / "checkpoints").exists()
    assert "adalora cannot resume from a checkpoint" in caplog.text


RESUMABLE = sorted(name for name, method in training.METHODS.items() if method.checkpoints)


@pytest.mark.slow  # one interrupted and one resumed run of 6 steps per method
@pytest.mark.parametrize("name", RESUMABLE)
def test_every_method_that_keeps_checkpoints_resumes_from_one(
    name,
    folders,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """A method's ``checkpoints = True`` is a promise that the Trainer can load its checkpoint
    back into the model the method prepares (AdaLoRA broke it: see the test above)."""
    config = short_config(folders, name)
    run_dir = tmp_path / name
    method = training.METHODS[name]
    with monkeypatch.context() as patch:
        patch.setitem(training.METHODS, name, WithCallback(method, InterruptAfterFirstCheckpoint()))
        with pytest.raises(Interrupted, match="step 3"):
            training.run_training(config, run_dir, progress=False)
    counter = CountSteps()
    monkeypatch.setitem(training.METHODS, name, WithCallback(method, counter))
    resumed = training.run_training(config, run_dir, progress=False)
    assert resumed["resumed"] is True
    assert counter.steps == [4, 5, 6]
    assert [e["epoch"] for e in resumed["epochs"]] == [1.0, 2.0]
