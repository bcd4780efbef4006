"""Fine-tuning under torchrun (DDP over gloo, two CPU processes) with a senslora LoraConfig."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import peft
import torch
from test_training import folders  # noqa: F401  (fixture: tiny model folders and task files)

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
    assert sum(allocation.ranks.values()) == 2 * len(allocation.ranks)

    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(folders / "bert")
    model = peft.PeftModel.from_pretrained(base, out / "adapter")
    ranks = {
        n: m.r["default"]
        for n, m in model.get_base_model().named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ranks == allocation.ranks
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[101, 2000, 102]])).logits
    assert torch.isfinite(logits).all()
