"""`load_spec` of `senslora bench`: every spec error names the file and what is wrong, and a
valid spec resolves its paths from its own folder and validates every run before any starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from senslora.finetune.grid import load_spec

VALID = """
out = "grid"
methods = ["lora", "senslora"]
tasks = ["glue:rte", "glue:sst2"]
seeds = [0, 1]
[defaults]
avg_rank = 2
glue_dir = "data/glue"
[overrides."glue:sst2"]
epochs = 1
"""


def write(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_a_valid_spec_resolves_paths_and_overrides(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    assert spec.out == (tmp_path / "grid").resolve()
    assert spec.defaults["glue_dir"] == str((tmp_path / "data" / "glue").resolve())
    assert spec.selection == "last"
    assert list(spec.runs())[:4] == [
        ("glue:rte", "lora", 0),
        ("glue:rte", "senslora", 0),
        ("glue:sst2", "lora", 0),
        ("glue:sst2", "senslora", 0),
    ]  # seed by seed
    assert spec.config("glue:sst2", "lora", 1).epochs == 1
    rte = spec.config("glue:rte", "senslora", 1)
    assert (rte.epochs, rte.avg_rank, rte.seed, rte.method) == (3, 2, 1, "senslora")
    assert spec.run_dir("glue:rte", "lora", 1) == spec.out / "glue-rte" / "lora" / "seed1"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: "extra = 1\n" + t, r"spec.toml: unknown keys \['extra'\]; known: \["),
        (lambda t: t.replace('out = "grid"', ""), "spec.toml: missing 'out'"),
        (lambda t: t.replace("seeds = [0, 1]", ""), "spec.toml: missing 'seeds'"),
        (lambda t: t.replace("avg_rank = 2", "avg_rnk = 2"), r"\[defaults\] has unknown fields"),
        (lambda t: t.replace("epochs = 1", "epoch = 1"), r"\[glue:sst2\] has unknown fields"),
        (lambda t: 'selection = "first"\n' + t, "selection must be 'last' or 'best', got 'first'"),
        (lambda t: t.replace('"lora", ', '"qlora", '), "method must be one of .*got 'qlora'"),
        (lambda t: t.replace("epochs = 1", "epochs = 0"), "epochs must be a positive integer"),
        (lambda t: t.replace("seeds = [0, 1]", "seeds = [0, 1"), "spec.toml is not valid TOML"),
    ],
    ids=[
        "unknown-key",
        "no-out",
        "no-seeds",
        "unknown-default",
        "unknown-override",
        "selection",
        "method",
        "run-validation",
        "toml",
    ],
)
def test_spec_errors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_spec(write(tmp_path, edit(VALID)))
    assert not (tmp_path / "grid").exists()  # refused before anything was written


def test_a_missing_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bench spec .*nope.toml does not exist"):
        load_spec(tmp_path / "nope.toml")


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_loads_and_validates_each_run(path):
    """A spec with a typo (a field, a method, a question's row) fails here, not hours into a grid:
    `load_spec` builds the TrainConfig of every run."""
    spec = load_spec(path)
    assert spec.methods and spec.tasks and spec.seeds
