"""Hypothesis fuzzing of the allocation and of the file loaders: a clear error or a valid
result, never another exception type."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from senslora import AllocationConfig, allocate_ranks, load_allocation
from senslora.allocation import METRIC_KEYS
from senslora.config import SCORES, WEIGHTINGS
from senslora.data import load_texts
from senslora.serialization import allocation_to_dict
from senslora.stats import ModuleStats
from senslora.targets import LayerShape

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------
# allocation on random synthetic statistics

_magnitudes = st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e6, 1e30])


@st.composite
def module_stats(draw):
    """1-8 modules with random shapes and compact (activation) or full (gradient) diagonals."""
    count = draw(st.integers(1, 8))
    stats = {}
    for i in range(count):
        d_out, d_in = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        shape = LayerShape(d_out, d_in, transposed=draw(st.booleans()))
        scale = draw(_magnitudes)
        if draw(st.booleans()):
            values = draw(st.lists(st.floats(0, 10), min_size=d_in, max_size=d_in))
            column = torch.tensor(values, dtype=torch.float32) * scale
            stats[f"m{i}"] = ModuleStats(f"m{i}", shape, "activation", column_values=column)
        else:
            n = d_out * d_in
            values = draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n))
            diagonal = torch.tensor(values, dtype=torch.float32).reshape(shape.weight_shape)
            stats[f"m{i}"] = ModuleStats(f"m{i}", shape, "hutchinson", diagonal=diagonal * scale)
        stats[f"m{i}"].num_tokens = 1
    return stats


@st.composite
def allocation_configs(draw):
    avg_rank = draw(st.integers(1, 16))
    min_rank = draw(st.integers(0, avg_rank))
    max_rank = draw(st.one_of(st.none(), st.integers(max(min_rank, 1), 20)))
    scheme = draw(st.sampled_from(["sra", "pra"]))
    return AllocationConfig(
        avg_rank=avg_rank,
        min_rank=min_rank,
        max_rank=max_rank,
        scheme=scheme,
        # PRA refuses a parameter budget (tested below): drawn it would waste half its cases
        budget="rank" if scheme == "pra" else draw(st.sampled_from(["rank", "parameters"])),
        score=draw(st.sampled_from(SCORES)),
        weighting=draw(st.sampled_from(WEIGHTINGS)),
        top_k_fraction=draw(st.floats(0.01, 1.0)),
        effective_rank_threshold=draw(st.floats(0.01, 1.0)),
        negative=draw(st.sampled_from(["abs", "clamp"])),
    )


def _expected_error(stats, config) -> str | None:
    """The message (a regex) allocate_ranks must raise for this case, None if it must succeed:
    worked out from the bounds alone, the only reason these statistics can be refused."""
    caps = [min(s.shape.out_features, s.shape.in_features) for s in stats.values()]
    highs = [min(c, config.max_rank or c) for c in caps]
    lows = [min(config.min_rank, h) for h in highs]
    target = config.avg_rank * len(caps)
    if config.budget == "rank" and not sum(lows) <= target <= sum(highs):
        return "cannot be met" if config.scheme == "sra" else "bounds cannot hold the budget"
    return None


@FUZZ
@given(stats=module_stats(), config=allocation_configs())
def test_allocation_is_valid_or_the_expected_error(stats, config):
    expected = _expected_error(stats, config)
    if expected is not None:
        with pytest.raises(ValueError, match=expected) as error:
            allocate_ranks(stats, config)
        assert "\n" not in str(error.value)
        return
    allocation = allocate_ranks(stats, config)  # any error here fails the case
    caps = {n: min(s.shape.out_features, s.shape.in_features) for n, s in stats.items()}
    for name, rank in allocation.ranks.items():
        upper = min(caps[name], config.max_rank or caps[name])
        assert min(config.min_rank, upper) <= rank <= upper, (name, rank)
    if config.budget == "rank":
        assert allocation.total_rank == config.avg_rank * len(stats)
    else:
        assert allocation.num_parameters <= allocation.uniform_parameters()
    again = allocate_ranks(stats, config)
    assert again.ranks == allocation.ranks


def test_pra_refuses_a_parameter_budget_and_defaults_to_the_rank_budget():
    with pytest.raises(ValueError, match="PRA scheme places ranks on levels .* got budget='param"):
        AllocationConfig(avg_rank=2, scheme="pra", budget="parameters")
    assert AllocationConfig(scheme="pra").budget == "rank"
    assert AllocationConfig().budget == "parameters"  # SRA: the paper's A.2 comparison rule


# ---------------------------------------------------------------------------------------
# allocation.json


def _valid_document() -> dict:
    stats = {
        f"layer.{i}.proj": ModuleStats(
            f"layer.{i}.proj",
            LayerShape(4, 3, transposed=False),
            "activation",
            column_values=torch.tensor([1.0, 2.0, 3.0 + i]),
            num_tokens=5,
        )
        for i in range(3)
    }
    return allocation_to_dict(allocate_ranks(stats, AllocationConfig(avg_rank=2)))


VALID = _valid_document()
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(document, prefix=()):
    """Every key path of a nested dict/list document."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


PATHS = [p for p in _paths(VALID) if p]


_plausible_values = (
    st.integers(0, 20)
    | st.lists(st.integers(1, 20), min_size=2, max_size=2)  # another valid shape
    | st.floats(0, 10)
)
"""Values of the kinds the file holds, so that many edits pass the schema check: an edited rank,
shape or metric that loads must be the edit itself, and an edited shape must not load."""


@st.composite
def mutated_documents(draw):
    document = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_values | _plausible_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return document


def _load(text: str | bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "allocation.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return load_allocation(path)


def _loads_or_clear_error(document) -> None:
    """Load the edited document: a one-line ValueError, or an allocation that says exactly what
    the document says. The module shapes may differ from the valid file's only if the edit
    check failed, so a loaded file with other shapes means the check let an edit through."""
    try:
        allocation = _load(json.dumps(document))
    except ValueError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert allocation.ranks == document["ranks"]
    assert allocation.shapes == {n: tuple(m["shape"]) for n, m in document["modules"].items()}
    assert allocation.shapes == {n: tuple(m["shape"]) for n, m in VALID["modules"].items()}
    for name, entry in document["modules"].items():
        assert allocation.metrics[name] == {k: entry[k] for k in METRIC_KEYS}
    assert allocation.weights == document["weights"]
    assert allocation.config.to_dict() == {**AllocationConfig().to_dict(), **document["config"]}
    assert allocation.provenance == document["provenance"]


@FUZZ
@given(document=mutated_documents())
def test_mutated_allocation_json_is_loaded_or_refused(document):
    _loads_or_clear_error(document)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["provenance"].pop("model_fingerprint"),
        lambda d: d["provenance"].update(model_fingerprint=None),
        lambda d: d["provenance"].update(model_fingerprint=12),
    ],
    ids=["deleted", "null", "number"],
)
def test_a_file_without_its_fingerprint_is_refused(edit):
    """Without the fingerprint an edited shape would load unchecked."""
    document = copy.deepcopy(VALID)
    edit(document)
    with pytest.raises(ValueError, match="model_fingerprint"):
        _load(json.dumps(document))


def test_an_edited_shape_is_refused():
    document = copy.deepcopy(VALID)
    document["modules"]["layer.0.proj"]["shape"] = [5, 3]
    with pytest.raises(ValueError, match="the file was edited"):
        _load(json.dumps(document))


@FUZZ
@given(value=json_values)
def test_random_json_is_refused(value):
    with pytest.raises(ValueError):
        _load(json.dumps(value))


@FUZZ
@given(data=st.binary(max_size=200), cut=st.integers(0, 4000))
def test_random_and_truncated_bytes_are_refused(data, cut):
    with pytest.raises(ValueError):
        _load(data)
    with pytest.raises(ValueError):
        _load(json.dumps(VALID)[: cut % len(json.dumps(VALID))])


def test_unreadable_allocation_paths():
    with tempfile.TemporaryDirectory() as folder:
        with pytest.raises(FileNotFoundError):
            load_allocation(Path(folder) / "missing.json")
        inner = Path(folder) / "run" / "allocation.json"
        inner.mkdir(parents=True)  # a directory where the file should be
        with pytest.raises(ValueError, match="not a file"):
            load_allocation(inner.parent)
        with pytest.raises(ValueError, match="deep"):
            _load("[" * 100_000 + "]" * 100_000)


# ---------------------------------------------------------------------------------------
# calibration files

SUFFIXES = [".txt", ".csv", ".tsv", ".jsonl", ".parquet"]


def _texts_or_clear_error(suffix: str, content: bytes, text_field=None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"calib{suffix}"
        path.write_bytes(content)
        try:
            texts = load_texts(str(path), text_field=text_field)
        except (ValueError, FileNotFoundError) as error:
            assert str(error) and "\n" not in str(error).strip(), str(error)
            return
    assert isinstance(texts, list) and all(isinstance(t, str) and t for t in texts)


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), content=st.binary(max_size=300))
def test_random_bytes_as_calibration_files(suffix, content):
    _texts_or_clear_error(suffix, content)


_cells = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@FUZZ
@given(
    suffix=st.sampled_from([".csv", ".tsv"]),
    rows=st.lists(st.lists(_cells, min_size=0, max_size=4), max_size=6),
    text_field=st.sampled_from([None, "text", "sentence", "nope"]),
)
def test_random_tables_as_calibration_files(suffix, rows, text_field):
    separator = "," if suffix == ".csv" else "\t"
    content = "\n".join(separator.join(row) for row in rows).encode("utf-8", "surrogatepass")
    _texts_or_clear_error(suffix, content, text_field)


@FUZZ
@given(
    lines=st.lists(st.one_of(json_values.map(json.dumps), _cells), max_size=6),
    text_field=st.sampled_from([None, "text", "nope"]),
)
def test_random_jsonl_as_calibration_files(lines, text_field):
    content = "\n".join(lines).encode("utf-8", "surrogatepass")
    _texts_or_clear_error(".jsonl", content, text_field)
