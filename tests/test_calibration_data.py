"""Calibration data: the wikitext cleaner, the shipped corpora, local/hub sources, batches."""

from __future__ import annotations

import bz2
import dataclasses
import json
import logging
import sys

import pandas as pd
import pytest
import torch
from conftest import missing_asset

from senslora.data import (
    CalibrationConfig,
    calibration_batches,
    clean_wikitext,
    count_tokens,
    describe_source,
    load_texts,
    minilm_path,
    package_file,
    read_wikipedia_articles,
    sample_texts,
    wikipedia_paragraphs,
    wikipedia_sample_path,
)

# ---------------------------------------------------------------------------------------
# Wikitext cleaner


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        pytest.param(
            "Alpha {{outer|x={{inner|{{deep}}}}|z}} beta.", "Alpha beta.", id="nested-templates"
        ),
        pytest.param(
            "The [[political philosophy]] of [[self-governance|self-governed]] [[bus]]es "
            "([[Note|see [1]]]).",
            "The political philosophy of self-governed buses (see [1]).",
            id="links",
        ),
        pytest.param(
            'It is a philosophy.<ref name="a">Woodcock, {{cite book|title=X}} p. 3</ref> '
            'It is old.<ref name="b"/> Yes.<ref>[[Peter Kropotkin]]</ref>',
            "It is a philosophy. It is old. Yes.",
            id="refs",
        ),
        pytest.param(
            "[[File:Makhno.jpg|thumb|left|[[Nestor Makhno]] with the [[Black Army|army]] "
            "[above]]]\nAnarchists took part.\n[[Image:X.png|[[a|b]] [[c]]]]",
            "Anarchists took part.",
            id="file-links-with-nested-links",
        ),
        pytest.param(
            "Text.\n[[Category:Anarchism| ]]\n[[de:Anarchismus]]", "Text.", id="category-language"
        ),
        pytest.param(
            'Before.\n{| class="wikitable"\n|-\n! Head\n|-\n| {{flag|X}} cell || [[Link]]\n'
            "{|\n| nested\n|}\n|}\nAfter.",
            "Before.\n\nAfter.",
            id="nested-tables",
        ),
        pytest.param(
            "Tom&nbsp;Smith &amp; Co. paid &pound;5 &ndash; a &quot;deal&quot;",
            'Tom Smith & Co. paid £5 – a "deal"',
            id="entities",
        ),
        pytest.param(
            "See [http://example.org/a?b=1 the site] and [https://example.org/bare].",
            "See the site and.",
            id="external-links",
        ),
        pytest.param(
            "== History ==\n'''Bold''' and ''italic'' text<!-- hidden\nnote -->.\n"
            "* first item\n# second <small>item</small>\n=== Sub ===\nEnd<br/>line.",
            "Bold and italic text.\nfirst item\nsecond item\nEnd line.",
            id="headings-quotes-lists-tags",
        ),
        pytest.param(
            "It is {{convert|5|km|mi|abbr=on}} long, {{convert|2|to|4|m|ft}} deep, "
            "called {{lang|fr|la {{small|Grande}} rivière}}.{{citation needed|date=May}}\n"
            "[[File:k.svg|thumb|Kanji {{lang|ja|[[wikt:気|気]]}}.]]{{lang|ja|[[wikt:気|気]]}}",
            "It is 5 km long, 2 to 4 m deep, called la rivière.\n気",
            id="convert-lang-templates",
        ),
        pytest.param(
            "Athens ({{lang-el|Ἀθῆναι}}) is a city. Energy <math>E=mc^2</math> is kept.",
            "Athens is a city. Energy is kept.",
            id="empty-parens-math",
        ),
        pytest.param(
            "Stray }} closer and ]] bracket.\nStart {{unclosed text [[goes]] on.",
            "Stray closer and bracket.\nStart unclosed text goes on.",
            id="unbalanced-braces-keep-text",
        ),
    ],
)
def test_clean_wikitext(wikitext: str, expected: str) -> None:
    assert clean_wikitext(wikitext) == expected


_EXPORT = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Alpha</title><ns>0</ns><revision><text>'''Alpha''' is the first [[letter]]
of the {{cite web|title=Greek}} alphabet and it is used in many places.

Short line.</text></revision></page>
  <page><title>Old</title><ns>0</ns><redirect title="Alpha" />
    <revision><text>#REDIRECT [[Alpha]]</text></revision></page>
  <page><title>Beta</title><ns>0</ns><revision><text>#redirect [[Alpha]]</text></revision></page>
  <page><title>Category:Letters</title><ns>14</ns>
    <revision><text>Letters of many alphabets used by many people.</text></revision></page>
  <page><title>Star Trek: Voyager</title><ns>0</ns>
    <revision><text>A television series set in space.</text></revision></page>
</mediawiki>"""


def test_read_wikipedia_articles_skips_redirects_and_namespaces(tmp_path) -> None:
    path = tmp_path / "export.xml.bz2"
    path.write_bytes(bz2.compress(_EXPORT.encode()))
    articles = read_wikipedia_articles(path)
    assert articles == [
        (
            "Alpha",
            "Alpha is the first letter\nof the alphabet and it is used in many places.\n\n"
            "Short line.",
        ),
        ("Star Trek: Voyager", "A television series set in space."),
    ]
    assert wikipedia_paragraphs(path, min_words=6) == [
        "of the alphabet and it is used in many places.",
        "A television series set in space.",
    ]
    with pytest.raises(ValueError, match="min_words must be a positive integer, got 0"):
        wikipedia_paragraphs(path, min_words=0)


def test_real_wikipedia_sample_is_clean_prose() -> None:
    try:
        path = wikipedia_sample_path()
    except FileNotFoundError as error:
        missing_asset(str(error))
    articles = read_wikipedia_articles(path)
    # gensim 4.4.0's file: 206 pages, 100 of them redirects.
    assert len(articles) == 106
    assert articles[0][0] == "Anarchism"
    paragraphs = wikipedia_paragraphs(path)
    assert len(paragraphs) > 5000
    assert all(len(paragraph.split()) >= 20 for paragraph in paragraphs)
    for marker in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "'''", "&nbsp;"):
        assert not [p for p in paragraphs if marker in p], marker


# ---------------------------------------------------------------------------------------
# Assets


def test_package_file_names_missing_package_and_hint() -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such_pkg_xyz.*is not installed.*make setup"):
        package_file("no_such_pkg_xyz", "a.txt", install_hint="run `make setup`")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt.*'json'.*pip install x"):
        package_file("json", "missing.txt", install_hint="pip install x")
    assert package_file("json", "decoder.py", install_hint="").name == "decoder.py"


# ---------------------------------------------------------------------------------------
# Local files and hub datasets

ROWS = [
    {"text": "  first text ", "label": 0},
    {"text": "second text", "label": 1},
    {"text": "   ", "label": 0},
]


def _write(path, rows) -> None:
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_tabular_files_read_text_column(tmp_path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    _write(path, ROWS)
    assert load_texts(str(path)) == ["first text", "second text"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_tabular_files_missing_field_names_columns(tmp_path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    _write(path, ROWS)
    with pytest.raises(ValueError, match=r"data\..*'review'.*\['text', 'label'\]"):
        load_texts(str(path), text_field="review")


def test_txt_file_one_text_per_line(tmp_path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("one line\n\n   \n  two line  \n")
    assert load_texts(str(path)) == ["one line", "two line"]


def test_text_field_fallbacks(tmp_path) -> None:
    sentence = tmp_path / "sentence.csv"
    pd.DataFrame({"sentence": ["a b"], "review": ["c d"]}).to_csv(sentence, index=False)
    assert load_texts(str(sentence)) == ["a b"]
    only_string = tmp_path / "only.jsonl"
    only_string.write_text('{"idx": 1, "body": "x y"}\n{"idx": 2, "body": "z"}\n')
    assert load_texts(str(only_string)) == ["x y", "z"]
    ambiguous = tmp_path / "two.csv"
    pd.DataFrame({"premise": ["a"], "hypothesis": ["b"]}).to_csv(ambiguous, index=False)
    with pytest.raises(ValueError, match=r"\['premise', 'hypothesis'\].*text_field"):
        load_texts(str(ambiguous))
    assert load_texts(str(ambiguous), text_field="hypothesis") == ["b"]


def test_bad_local_sources(tmp_path) -> None:
    unknown = tmp_path / "data.xml"
    unknown.write_text("<x/>")
    with pytest.raises(ValueError, match=r"data\.xml.*\.txt.*found '\.xml'"):
        load_texts(str(unknown))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_texts(str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError):
        load_texts("no/such/dir/file")
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected one JSON object.*list"):
        load_texts(str(not_object))


def test_hub_dataset_via_load_dataset(monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"question": [" q1 ", "", "q2"], "label": [0, 1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("wikitext:wikitext-2-raw-v1", split="validation") == ["q1", "q2"]
    assert load_texts("owner/piqa", text_field="question") == ["q1", "q2"]
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("owner/piqa", None, "train"),
    ]
    with pytest.raises(ValueError, match=r"hf:piqa/train.*'goal'.*\['question', 'label'\]"):
        load_texts("piqa", text_field="goal")


def test_hub_without_datasets_asks_for_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'pip install "senslora\[hub\]"'):
        load_texts("piqa")


def test_describe_source(tmp_path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("a\n")
    assert describe_source("wikipedia") == "wikipedia"
    assert describe_source(str(path)) == str(path.resolve())
    assert describe_source("wikitext:wikitext-2-raw-v1", split="test") == (
        "hf:wikitext:wikitext-2-raw-v1/test"
    )
    assert describe_source("piqa") == "hf:piqa/train"


def test_sample_texts_seeded_without_replacement(caplog) -> None:
    texts = [f"t{i}" for i in range(50)]
    first = sample_texts(texts, 10, seed=3)
    assert first == sample_texts(texts, 10, seed=3)
    assert first != sample_texts(texts, 10, seed=4)
    assert len(set(first)) == 10 and set(first) <= set(texts)
    with caplog.at_level(logging.WARNING, logger="senslora.data.calibration"):
        few = sample_texts(texts[:5], 10, seed=0)
    assert sorted(few) == texts[:5]
    assert "only 5 calibration texts" in caplog.text


# ---------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_samples", 0, "num_samples must be a positive integer, got 0"),
        ("seq_len", -1, "seq_len must be a positive integer, got -1"),
        ("batch_size", 2.0, "batch_size must be a positive integer, got 2.0"),
        ("min_tokens", True, "min_tokens must be a positive integer, got True"),
        ("seed", -1, "seed must be a non-negative integer, got -1"),
        ("source", " ", "source must be a non-empty string, got ' '"),
        ("text_field", "", "text_field must be a non-empty string, got ''"),
        ("split", None, "split must be a non-empty string, got None"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CalibrationConfig(**{field: value})


def test_config_min_tokens_at_most_seq_len() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be at most seq_len \(4\), got 5"):
        CalibrationConfig(seq_len=4, min_tokens=5)


# ---------------------------------------------------------------------------------------
# Token batches

TEXTS = [
    "a",
    "the cat sat",
    "a much longer sentence about calibration data for low rank adapters",
    "hello world",
    "one two three four five",
    "short",
    "tokenizers split words into pieces",
    "seven",
    "the quick brown fox jumps over the lazy dog",
    "padding is dynamic",
]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    try:
        path = minilm_path()
    except FileNotFoundError as error:
        missing_asset(str(error))
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _expected_rows(tokenizer, config: CalibrationConfig) -> list[list[int]]:
    chosen = sample_texts(TEXTS, config.num_samples, config.seed)
    rows = tokenizer(chosen, truncation=True, max_length=config.seq_len)["input_ids"]
    return [ids for ids in rows if len(ids) >= config.min_tokens]


def _rows(batches) -> list[list[int]]:
    """The real tokens of every sequence, in batch order."""
    return [
        ids[mask.bool()].tolist()
        for batch in batches
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batches_dynamic_padding_and_mask(minilm_tokenizer, text_file, padding_side) -> None:
    tokenizer = type(minilm_tokenizer).from_pretrained(minilm_path(), padding_side=padding_side)
    config = CalibrationConfig(source=str(text_file), num_samples=10, batch_size=4, seq_len=8)
    batches = calibration_batches(tokenizer, config)
    expected = _expected_rows(tokenizer, config)
    assert [len(batch["input_ids"]) for batch in batches] == [4, 4, 2]
    rows = [expected[0:4], expected[4:8], expected[8:10]]
    for batch, batch_rows in zip(batches, rows, strict=True):
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
        width = max(len(ids) for ids in batch_rows)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(batch_rows), width)
        for row, ids in enumerate(batch_rows):
            pad = width - len(ids)
            mask = [1] * len(ids) + [0] * pad
            padded = ids + [tokenizer.pad_token_id] * pad
            if padding_side == "left":
                mask, padded = mask[::-1], [tokenizer.pad_token_id] * pad + ids
            assert batch["attention_mask"][row].tolist() == mask
            assert batch["input_ids"][row].tolist() == padded
    assert max(len(ids) for ids in expected) == 8  # the long text was truncated to seq_len
    assert min(batch["input_ids"].shape[1] for batch in batches) < 8  # padded per batch
    assert count_tokens(batches) == sum(len(ids) for ids in expected)


def test_batches_are_seeded(minilm_tokenizer, text_file) -> None:
    config = CalibrationConfig(source=str(text_file), num_samples=6, batch_size=3, seed=1)
    first = calibration_batches(minilm_tokenizer, config)
    again = calibration_batches(minilm_tokenizer, config)
    other = calibration_batches(minilm_tokenizer, dataclasses.replace(config, seed=2))
    assert _rows(first) == _rows(again)
    assert _rows(first) != _rows(other)


def test_short_sequences_dropped_and_empty_set_error(minilm_tokenizer, text_file) -> None:
    config = CalibrationConfig(source=str(text_file), num_samples=10, min_tokens=5)
    batches = calibration_batches(minilm_tokenizer, config)
    lengths = [len(ids) for ids in _rows(batches)]
    expected = _expected_rows(minilm_tokenizer, config)
    assert lengths == [len(ids) for ids in expected]
    assert min(lengths) >= 5 and len(lengths) < len(TEXTS)  # "a", "short", ... were dropped
    too_long = CalibrationConfig(source=str(text_file), num_samples=10, min_tokens=200)
    with pytest.raises(ValueError, match=r"calibration set is empty: source .*calib\.txt"):
        calibration_batches(minilm_tokenizer, too_long)


class WordTokenizer:
    """One id per word plus an eos id; no pad token, like many causal-LM tokenizers."""

    pad_token_id = None
    eos_token_id = 99
    padding_side = "right"

    def __call__(self, texts, truncation, max_length):
        ids = [[len(word) for word in text.split()][: max_length - 1] + [99] for text in texts]
        return {"input_ids": [row[:max_length] for row in ids]}


def test_pads_with_eos_without_mutating_tokenizer(tmp_path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("aa bbb\nc\n")
    tokenizer = WordTokenizer()
    config = CalibrationConfig(source=str(path), num_samples=2, min_tokens=1)
    (batch,) = calibration_batches(tokenizer, config)
    rows = sorted(batch["input_ids"].tolist())
    assert rows == [[1, 99, 99], [2, 3, 99]]  # "c" + eos, then padded with eos
    assert sorted(batch["attention_mask"].tolist()) == [[1, 1, 0], [1, 1, 1]]
    assert tokenizer.pad_token_id is None and WordTokenizer.pad_token_id is None
