"""``allocation.json``: the allocation, its metrics, configuration and provenance, on disk.

The file is written atomically. Loading checks the schema; applying checks that the file belongs
to the model (every module, named relative to the backbone, matches exactly one module of the
model with the same shape; the shapes are summarised by a fingerprint). ``backbone`` was added
without a new schema version: files without it load with ``backbone = ""`` (full names).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from senslora.allocation import METRIC_KEYS, Allocation
from senslora.config import AllocationConfig
from senslora.files import write_text_atomic
from senslora.targets import is_adaptable, layer_shape

SCHEMA = "senslora.allocation"
SCHEMA_VERSION = 1
FILENAME = "allocation.json"


def shapes_fingerprint(shapes: Mapping[str, tuple[int, int]]) -> str:
    """sha256 of the sorted ``name:d_out x d_in`` lines of the target modules."""
    lines = "\n".join(f"{name}:{d_out}x{d_in}" for name, (d_out, d_in) in sorted(shapes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def allocation_to_dict(
    allocation: Allocation, alphas: Mapping[str, float] | None = None
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "backbone": allocation.backbone,
        "ranks": dict(allocation.ranks),
        "alphas": dict(alphas) if alphas is not None else None,
        "modules": {
            name: {"shape": list(allocation.shapes[name]), **allocation.metrics[name]}
            for name in allocation.ranks
        },
        "weights": dict(allocation.weights),
        "config": allocation.config.to_dict(),
        "provenance": {
            **allocation.provenance,
            "model_fingerprint": shapes_fingerprint(allocation.shapes),
        },
    }


def save_allocation(
    allocation: Allocation, path: str | Path, *, alphas: Mapping[str, float] | None = None
) -> Path:
    """Write the allocation to ``path`` (a file, or a directory that gets ``allocation.json``)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / FILENAME
    text = json.dumps(allocation_to_dict(allocation, alphas), indent=2, allow_nan=False)
    write_text_atomic(path, text + "\n")
    return path


def load_allocation(path: str | Path) -> Allocation:
    """Read and validate an ``allocation.json`` (or the one inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no allocation file at {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is not a file: expected an allocation.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file may be truncated") from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON too deeply to be an allocation file") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    return allocation_from_dict(data, source=str(path))


def allocation_from_dict(data: Any, source: str = "allocation") -> Allocation:
    """Validate the parsed JSON and build the Allocation; errors name what was expected."""

    def fail(message: str) -> ValueError:
        return ValueError(f"{source}: {message}")

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise fail(
            f"expected a JSON object with schema {SCHEMA!r}, got "
            f"{data.get('schema') if isinstance(data, dict) else type(data).__name__!r}"
        )
    if data.get("schema_version") != SCHEMA_VERSION:
        raise fail(f"expected schema_version {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    for key, kind in (
        ("ranks", dict),
        ("modules", dict),
        ("weights", dict),
        ("config", dict),
        ("provenance", dict),
    ):
        if not isinstance(data.get(key), kind):
            raise fail(f"expected {key!r} to be an object, got {type(data.get(key)).__name__}")
    ranks, modules = data["ranks"], data["modules"]
    if set(ranks) != set(modules):
        raise fail("'ranks' and 'modules' name different modules")
    for name, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise fail(f"rank of {name} must be an integer >= 0, got {rank!r}")
        entry = modules[name]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise fail(f"shape of {name} must be [d_out, d_in], got {shape!r}")
        for key in METRIC_KEYS:
            if not _is_finite_number(entry.get(key)):
                raise fail(
                    f"metric {key!r} of {name} must be a finite number, got {entry.get(key)!r}"
                )
    for key, value in data["weights"].items():
        if not _is_finite_number(value):
            raise fail(f"weight {key!r} must be a finite number, got {value!r}")
    alphas = data.get("alphas")
    if alphas is not None and (
        not isinstance(alphas, dict) or not all(map(_is_finite_number, alphas.values()))
    ):
        raise fail(f"expected 'alphas' to be null or an object of numbers, got {alphas!r:.80}")
    try:
        config = AllocationConfig.from_dict(data["config"])
    except (TypeError, ValueError) as error:
        raise fail(f"invalid config: {error}") from None
    backbone = data.get("backbone", "")
    if not isinstance(backbone, str):
        raise fail(f"expected 'backbone' to be a dotted module path, got {backbone!r:.80}")
    shapes = {name: tuple(modules[name]["shape"]) for name in ranks}
    fingerprint = data["provenance"].get("model_fingerprint")
    if not isinstance(fingerprint, str):  # without it an edited shape would load unchecked
        raise fail(
            "expected provenance.model_fingerprint to be the sha256 string written with the "
            f"file, got {fingerprint!r:.80}"
        )
    if fingerprint != shapes_fingerprint(shapes):
        raise fail("model_fingerprint does not match the module shapes: the file was edited")
    return Allocation(
        ranks=dict(ranks),
        shapes=shapes,
        metrics={name: {k: float(modules[name][k]) for k in METRIC_KEYS} for name in ranks},
        weights={k: float(v) for k, v in data["weights"].items()},
        config=config,
        provenance=dict(data["provenance"]),
        backbone=backbone,
    )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_model_matches(allocation: Allocation, model: nn.Module) -> None:
    """Raise ValueError naming the modules of the allocation (relative to its backbone) that
    match no module of ``model``, several, or one that is not a Linear/Conv1D of that shape."""
    from senslora.peft_bridge import resolve_modules

    relative = dict(zip(allocation.relative_ranks(), allocation.ranks, strict=True))
    found = resolve_modules(relative, model)
    modules = dict(model.named_modules())
    for key, target in found.items():
        module, shape = modules[target], allocation.shapes[relative[key]]
        if not is_adaptable(module):
            raise ValueError(
                f"allocation does not fit this model: {target} is a {type(module).__name__}, "
                "not a Linear/Conv1D layer"
            )
        got = layer_shape(module)
        if (got.out_features, got.in_features) != tuple(shape):
            raise ValueError(
                f"allocation does not fit this model: {target} is {got.out_features}x"
                f"{got.in_features} here but {shape[0]}x{shape[1]} in the allocation"
            )
