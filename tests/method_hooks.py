"""Wrappers of a fine-tuning method that let a test watch or steer its Trainer (helpers for
tests that call `run_training` or `senslora train` in-process; not a test module)."""

from __future__ import annotations

from transformers import TrainerCallback


class WithCallback:
    """``method`` with ``callback`` added to the callbacks of the Trainer it prepares for.
    Install it with ``monkeypatch.setitem(training.METHODS, name, WithCallback(...))``."""

    def __init__(self, method, callback: TrainerCallback):
        self.method, self.callback = method, callback

    def __getattr__(self, name):
        return getattr(self.method, name)

    def prepare(self, model, ctx):
        prepared = self.method.prepare(model, ctx)
        prepared.callbacks.append(self.callback)
        return prepared
