"""`TrainConfig` refuses every invalid field with a message naming the field, what it expected
and the value it got; valid edge values are accepted."""

from __future__ import annotations

import pytest

from senslora.finetune.config import METHODS, TrainConfig

POSITIVE = (
    "avg_rank",
    "epochs",
    "batch_size",
    "eval_batch_size",
    "max_length",
    "calib_samples",
    "calib_seq_len",
    "max_new_tokens",
    "hyperadalora_width",
)
OPTIONAL_POSITIVE = ("train_limit", "dev_limit", "adalora_init_rank", "max_rank")


@pytest.mark.parametrize("name", POSITIVE + OPTIONAL_POSITIVE)
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value!r}"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("name", OPTIONAL_POSITIVE)
def test_optional_integers_accept_none(name):
    assert getattr(TrainConfig(**{name: None}), name) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "qlora", r"method must be one of \(.*'senslora'.*\), got 'qlora'"),
        ("learning_rate", 0.0, "learning_rate must be > 0, got 0.0"),
        ("learning_rate", -1e-4, "learning_rate must be > 0, got -0.0001"),
        ("budget", "flops", r"budget must be one of \('rank', 'parameters'\), got 'flops'"),
        ("warmup_ratio", 1.0, r"warmup_ratio must be in \[0, 1\), got 1.0"),
        ("warmup_ratio", -0.1, r"warmup_ratio must be in \[0, 1\), got -0.1"),
        ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ("hyperadalora_init", "random", r"hyperadalora_init must be one of .*got 'random'"),
        ("hyperadalora_width", 30, "hyperadalora_width must be a multiple of 4, got 30"),
        ("hyperadalora_residual", 1, "hyperadalora_residual must be a bool, got 1"),
        ("eval_steps", -1, "eval_steps must be an integer >= 0, got -1"),
        ("eval_steps", True, "eval_steps must be an integer >= 0, got True"),
        ("eval_steps", 1.5, "eval_steps must be an integer >= 0, got 1.5"),
        ("eva_rho", 0.5, "eva_rho must be >= 1, got 0.5"),
    ],
)
def test_invalid_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_edge_values_and_every_method_are_accepted():
    config = TrainConfig(warmup_ratio=0.0, lora_dropout=0.0, eval_steps=0, eva_rho=1.0)
    assert (config.warmup_ratio, config.eval_steps, config.eva_rho) == (0.0, 0, 1.0)
    for method in METHODS:
        assert TrainConfig(method=method).method == method


def test_alpha_defaults_to_twice_the_average_rank():
    assert TrainConfig(avg_rank=8).alpha == 16.0
    assert TrainConfig(avg_rank=8, lora_alpha=4.0).alpha == 4.0
    assert TrainConfig(avg_rank=3).to_dict()["avg_rank"] == 3


def test_senslora_train_has_every_field_with_the_config_default():
    """`senslora train` exposes every TrainConfig field, its default read from TrainConfig."""
    import dataclasses

    import typer

    from senslora.cli import app
    from senslora.finetune.config import default_of, help_of

    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in command.params}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(options) == names | {"out", "overwrite", "verbose"}
    for name in names:
        assert options[name].default == default_of(name), name
        assert options[name].help == help_of(name), name
