"""Generation tasks: instruction/response JSONL files and the built-in ``wikipedia_lead``.

``gen:<path.jsonl>``: one JSON object per line with ``instruction``, an optional ``input``
(appended to the instruction after a newline) and ``response`` (or ``output``). The dev split
is ``<stem>.dev.jsonl`` or ``dev.jsonl`` beside the file when one exists, else a fixed hash
split of 10% of the examples (by prompt).

``wikipedia_lead``: from the real Wikipedia articles shipped by gensim, the model reads a
paragraph without its first sentence and writes that sentence. Articles are split between
train and dev by a hash of their title (no article in both).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from senslora.data.wikipedia import read_wikipedia_articles
from senslora.finetune.tasks.base import (
    GenerationExample,
    GenerationTask,
    RowTally,
    find_dev_file,
    hash_split,
    iter_records,
    require_file,
    split_local_file,
)

__all__ = [
    "LEAD_INSTRUCTION",
    "load_instruction_jsonl",
    "load_wikipedia_lead",
    "split_first_sentence",
]

WIKIPEDIA_DEV_FRACTION = 0.2
LEAD_INSTRUCTION = "Write the opening sentence of this Wikipedia paragraph.\n\n"
LEAD_SENTENCE_WORDS = (8, 40)
"""Inclusive bounds on the words of a kept first sentence."""
LEAD_CONTEXT_WORDS = (10, 80)
"""Paragraphs whose rest has fewer words are dropped; longer rests are cut to the maximum."""
LEAD_MIN_PARAGRAPH_WORDS = 20

# A sentence ends at . ! or ? (plus closing quotes or brackets) followed by a space and a
# capital letter, a digit or an opening quote, unless the word before is an abbreviation.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr mt ft no nos vol pp ch fig gen col lt capt sgt rev gov sen "
    "rep inc ltd co corp bros vs etc approx ca c b d fl cf al ed eds jan feb mar apr jun jul "
    "aug sep sept oct nov dec".split()
)
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")


def _is_abbreviation(text_before: str) -> bool:
    """Whether the last word of ``text_before`` (ending in '.') is an abbreviation or initial."""
    words = text_before.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'(\u201c\u2018[")
    return _INITIALS.fullmatch(word) is not None or word[:-1].lower() in _ABBREVIATIONS


def split_first_sentence(paragraph: str) -> tuple[str, str] | None:
    """(first sentence, rest) of a paragraph, or None when it has a single sentence.

    A small rule-based splitter: a period after an abbreviation ('Dr.', 'c.') or an initial
    ('J.', 'U.S.') does not end a sentence.
    """
    for match in _SENTENCE_END.finditer(paragraph):
        before = paragraph[: match.start() + 1]
        if paragraph[match.start()] == "." and _is_abbreviation(before):
            continue
        first, rest = paragraph[: match.end()].strip(), paragraph[match.end() :].strip()
        return (first, rest) if rest else None
    return None


def _lead_example(paragraph: str) -> GenerationExample | None:
    parts = split_first_sentence(paragraph)
    if parts is None:
        return None
    first, rest = parts
    low, high = LEAD_SENTENCE_WORDS
    context = rest.split()
    if not low <= len(first.split()) <= high or len(context) < LEAD_CONTEXT_WORDS[0]:
        return None
    return GenerationExample(LEAD_INSTRUCTION + " ".join(context[: LEAD_CONTEXT_WORDS[1]]), first)


def load_wikipedia_lead(path: str | Path | None = None) -> GenerationTask:
    """Write the first sentence of a Wikipedia paragraph, given the rest of it.

    Paragraphs have at least 20 words; kept examples have a first sentence of 8..40 words and a
    rest of at least 10 words, cut to its first 80. Dev: the articles whose title hashes into
    the lowest 20%. ``path`` defaults to the export shipped by gensim.
    """
    articles = read_wikipedia_articles(path)
    train_articles, dev_articles = hash_split(articles, lambda a: a[0], WIKIPEDIA_DEV_FRACTION)

    def examples(chosen: tuple[tuple[str, str], ...]) -> tuple[GenerationExample, ...]:
        paragraphs = (
            paragraph
            for _, text in chosen
            for paragraph in text.split("\n")
            if len(paragraph.split()) >= LEAD_MIN_PARAGRAPH_WORDS
        )
        return tuple(e for e in map(_lead_example, paragraphs) if e is not None)

    return GenerationTask(
        name="wikipedia_lead",
        train=examples(train_articles),
        dev={"dev": examples(dev_articles)},
    )


# ---------------------------------------------------------------------------------------
# Instruction / response JSONL


def _string(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    return value.strip() if isinstance(value, str) else ""


def _instruction_example(record: dict[str, Any]) -> GenerationExample:
    """The example of one record; ValueError with the reason if malformed."""
    instruction, extra = _string(record, "instruction"), _string(record, "input")
    response = _string(record, "response") or _string(record, "output")
    if not instruction or not response:
        raise ValueError("expected non-empty 'instruction' and 'response' (or 'output')")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return GenerationExample(prompt, response)


def _read_instructions(path: Path) -> tuple[GenerationExample, ...]:
    tally = RowTally(str(path))
    examples = []
    for line, record in iter_records(path):
        try:
            if record is None:
                raise ValueError("not a JSON object")
            examples.append(_instruction_example(record))
        except ValueError as error:
            tally.skip(line, str(error))
        else:
            tally.ok()
    tally.finish()
    return tuple(examples)


def load_instruction_jsonl(path: str | Path) -> GenerationTask:
    """A generation task from a JSONL file of instruction/response pairs."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"gen:{path}: expected a file ending in .jsonl")
    require_file(path, "a .jsonl file of {'instruction', 'input'?, 'response' | 'output'} objects")
    train = _read_instructions(path)
    dev_path = find_dev_file(path)
    if dev_path:
        dev = _read_instructions(dev_path)
    else:
        train, dev = split_local_file(train, lambda example: example.prompt, path)
    return GenerationTask(name=f"gen:{path.resolve()}", train=train, dev={"dev": dev})
