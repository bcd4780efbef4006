"""What a run shows: the progress bar's status line, and warnings filtered one by one."""

from __future__ import annotations

import io
import types
import warnings

from rich.console import Console

from senslora.finetune.progress import RichProgress, quiet_libraries


def emit(message: str, module: str) -> None:
    warnings.warn_explicit(message, FutureWarning, "file.py", 1, module=module)


def test_known_harmless_warnings_are_silenced_and_nothing_else():
    harmless = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            emit(harmless, "transformers.modeling_utils")
            emit(harmless, "mypackage.code")  # same text from elsewhere: kept
            emit("something else", "transformers.trainer")  # other text: kept
        with quiet_libraries(verbose=True):
            emit(harmless, "transformers.modeling_utils")  # --verbose: kept
    assert [(str(w.message), w.filename) for w in caught] == [
        (harmless, "file.py"),
        ("something else", "file.py"),
        (harmless, "file.py"),
    ]


def test_progress_reports_loss_and_dev_metric_once_per_evaluation_in_a_log():
    out = io.StringIO()
    progress = RichProgress("lora on glue:rte (seed 0)", "accuracy", Console(file=out))
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0)
    progress.on_train_begin(None, state, None)
    state.global_step = 5
    progress.on_step_end(None, state, None)
    progress.on_log(None, state, None, logs={"loss": 0.69314})
    progress.on_log(None, state, None, logs={"eval_accuracy": 0.5625, "eval_loss": 0.7})
    progress.on_train_end(None, state, None)
    assert progress.status() == "loss 0.6931  dev accuracy 56.25"
    lines = [line for line in out.getvalue().splitlines() if "step 5/10" in line]
    assert lines == ["lora on glue:rte (seed 0): step 5/10, loss 0.6931  dev accuracy 56.25"]
