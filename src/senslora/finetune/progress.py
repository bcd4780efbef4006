"""What a training run shows a person: one rich progress bar with the loss and the latest dev
metric, instead of the Trainer's tqdm bars and raw log dictionaries; and the library warnings
that are known to be harmless here, silenced one by one (by message and module)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import TrainerCallback

HARMLESS_WARNINGS: tuple[tuple[str, str], ...] = (
    # (message regex, module regex): each was checked to say nothing about a senslora run
    # GPT-2's Conv1D layers: peft switches fan_in_fan_out on by itself, as it should
    (r".*fan_in_fan_out is set to False.*", r"peft\..*"),
    # raised by the Trainer's own call of a renamed transformers method
    (r".*`is_gradient_checkpointing` is deprecated.*", r"transformers\..*"),
)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Silence `HARMLESS_WARNINGS` (nothing when ``verbose``) for the duration of the block."""
    with warnings.catch_warnings():
        if not verbose:
            for message, module in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, module=module)
        yield


class RichProgress(TrainerCallback):
    """One progress bar per run: optimizer steps, the last logged training loss and the latest
    dev metric (``main_metric``). Shown on the main process only; when the console is not a
    terminal (a log file), each evaluation also prints one line."""

    def __init__(self, description: str, main_metric: str, console: Console | None = None):
        self.description = description
        self.main_metric = main_metric
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self.loss: float | None = None
        self.metric: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=not self.console.is_terminal,  # a log file keeps the evaluation lines only
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, completed=state.global_step, status=""
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self.status())

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        evaluated = False
        for key, value in logs.items():
            if key.startswith("eval_") and key.endswith(self.main_metric):
                self.metric, evaluated = float(value), True
        if self.progress is not None:
            self.progress.update(self.task, status=self.status())
            if evaluated and not self.console.is_terminal:  # a log file: one line per evaluation
                self.console.print(
                    f"{self.description}: step {state.global_step}/{state.max_steps}, "
                    f"{self.status()}"
                )

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self.status())
            self.progress.stop()
            self.progress = None

    def status(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.metric is not None:
            parts.append(f"dev {self.main_metric} {100 * self.metric:.2f}")
        return "  ".join(parts)
