"""Fine-tuning under torchrun (DDP over gloo, two CPU processes) with a senslora LoraConfig."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from ddp_worker import train_and_record
from test_training import folders  # noqa: F401  (fixture: tiny model folders and task files)

from senslora.finetune.config import TrainConfig
from senslora.serialization import load_allocation


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_training_saves_a_reloadable_adapter(folders, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "senslora",
        "train",
        "--method",
        "senslora",
        "--task",
        f"csv:{folders / 'sentiment.csv'}",
        "--model",
        str(folders / "bert"),
        "--avg-rank",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "16",
        "--max-length",
        "32",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    allocation = load_allocation(out / "allocation.json")
    assert results["ranks"] == allocation.ranks
    assert allocation.num_parameters <= allocation.uniform_parameters()  # the default budget
    assert results["head_pooling"] != "model"  # the default: a head on the model's pooling

    from senslora.finetune.heads import load_classifier

    batch = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        untrained = load_classifier(str(folders / "bert"), 2, pooling=results["head_pooling"])
        untrained_logits = untrained.eval()(input_ids=batch).logits
    base = load_classifier(str(folders / "bert"), 2, pooling=results["head_pooling"])
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    ranks = {
        n: m.r["default"]
        for n, m in model.get_base_model().named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ranks == allocation.ranks
    with torch.no_grad():
        logits = model(input_ids=batch).logits
        merged = model.merge_and_unload()(input_ids=batch).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, untrained_logits, atol=1e-4)  # the trained head and adapter
    torch.testing.assert_close(merged, logits, rtol=1e-4, atol=1e-5)


def torchrun_worker(config: dict, out: Path, processes: int = 2) -> list[dict]:
    """``tests/ddp_worker.py`` under torchrun: the record of every process, by rank."""
    config_file = out.with_suffix(".config.json")
    config_file.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += [str(Path(__file__).with_name("ddp_worker.py")), str(config_file), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(processes)]


@pytest.mark.slow  # two torchrun processes and one in-process run: 11-25 s
def test_two_processes_train_the_weights_of_one_process_at_the_same_global_batch(
    folders,  # noqa: F811
    tmp_path,
):
    """8 examples per process on 2 processes = 16 in one process: the same examples in every
    step (the seeded sampler's first 16 indices, split 8 + 8), the gradients averaged by DDP.
    What may differ is the order of float32 additions (two half-batch means averaged instead of
    one mean), about 1e-8 on these weights after 6 Adam steps; a wrong gradient scale (the loss
    multiplied by the number of processes, which changes gradient clipping) or a wrong batch
    moves them by about one learning-rate step (5e-3), hence the tolerance 1e-6."""
    config = dict(
        method="senslora",
        task=f"csv:{folders / 'sentiment.csv'}",
        model=str(folders / "bert"),
        avg_rank=2,
        epochs=1,
        learning_rate=5e-3,
        calib_samples=8,
        calib_seq_len=16,
        device="cpu",
        max_length=32,
    )
    single = train_and_record(TrainConfig(**config, batch_size=16), tmp_path / "single")
    ranks = torchrun_worker({**config, "batch_size": 8}, tmp_path / "ddp")

    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["writes"] == single["writes"] == ["adapter", "results.json"]
    assert ranks[1]["writes"] == []  # only the main process writes
    assert (tmp_path / "ddp" / "results.json").exists()
    assert sorted(ranks[0]["weights"]) == sorted(single["weights"])
    for name, weight in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=0, atol=1e-6)
    assert any(not torch.equal(w, 0 * w) for n, w in single["weights"].items() if "lora_B" in n)

    saved = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert saved["ranks"] == single["results"]["ranks"]  # the sharded calibration agrees
    assert saved["num_train"] == single["results"]["num_train"] == 96
    torch.testing.assert_close(saved["train_losses"], single["results"]["train_losses"])
    assert saved["last"]["accuracy"] == single["results"]["last"]["accuracy"]
