"""One `run_training` call that records, per process, what it trained and what it wrote.

Run as ``python -m torch.distributed.run --nproc_per_node N tests/ddp_worker.py CONFIG OUT`` (or
imported, in a single process): CONFIG is a JSON file of TrainConfig fields. Every process writes
``OUT.rank<R>.pt``: its rank, the trainable parameters of its model after training, the files it
wrote through the run's writers (results.json, the adapter) and the results it returned. Not a
test module (pytest collects test_*.py only).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

from senslora.finetune import training
from senslora.finetune.config import TrainConfig


class Recording:
    """A fine-tuning method that keeps the model it prepared and the folders it saved to."""

    def __init__(self, method, writes: list[str], out_dir: Path):
        self.method, self.writes, self.out_dir, self.models = method, writes, out_dir, []

    def __getattr__(self, name):
        return getattr(self.method, name)

    def prepare(self, model, ctx):
        prepared = self.method.prepare(model, ctx)
        self.models.append(prepared.model)
        return prepared

    def save(self, prepared, folder):
        self.writes.append(str(Path(folder).relative_to(self.out_dir)))
        return self.method.save(prepared, folder)


def train_and_record(config: TrainConfig, out_dir: Path) -> dict:
    """``run_training(config, out_dir)`` with the prepared model and every write recorded; the
    record is also saved to ``<out_dir>.rank<R>.pt``."""
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    recording = Recording(training.METHODS[config.method], writes, out_dir)
    write_text = training.write_text_atomic

    def record_write(path, text):
        writes.append(str(Path(path).relative_to(out_dir)))
        return write_text(path, text)

    with (
        mock.patch.dict(training.METHODS, {config.method: recording}),
        mock.patch.object(training, "write_text_atomic", record_write),
    ):
        results = training.run_training(config, out_dir, progress=False)
    weights = {
        name: parameter.detach().clone()
        for name, parameter in recording.models[0].named_parameters()
        if parameter.requires_grad
    }
    record = {"rank": rank, "weights": weights, "writes": writes, "results": results}
    torch.save(record, f"{out_dir}.rank{rank}.pt")
    return record


if __name__ == "__main__":
    fields = json.loads(Path(sys.argv[1]).read_text())
    train_and_record(TrainConfig(**fields), Path(sys.argv[2]))
