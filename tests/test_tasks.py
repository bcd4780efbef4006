"""Task datasets: GLUE readers (real files and fixtures), hub path, local files, built-ins."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
from conftest import missing_asset

from senslora.data import read_wikipedia_articles
from senslora.finetune.tasks import (
    ClassificationTask,
    Example,
    GenerationExample,
    GenerationTask,
    load_task,
)
from senslora.finetune.tasks.base import hash_fraction, hash_split, select_subset
from senslora.finetune.tasks.generation import LEAD_INSTRUCTION, split_first_sentence

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
REAL_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
REAL_TASKS = ("cola", "sst2", "mrpc", "rte")
"""Tasks read from ../shared/data/glue; the fixtures hold only the formats it has no data for."""

# ---------------------------------------------------------------------------------------
# Real GLUE files (../shared/data/glue), skipped where absent (failed in CI)


def require_glue(folder: Path) -> Path:
    if not folder.is_dir():
        missing_asset(f"real GLUE data not present at {folder}")
    return folder


@pytest.fixture
def real_glue():
    return require_glue(REAL_GLUE)


def test_missing_glue_data_fails_in_ci_and_is_skipped_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="real GLUE data not present.*CI is set"):
        require_glue(tmp_path / "glue")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="real GLUE data not present"):
        require_glue(tmp_path / "glue")
    assert require_glue(tmp_path) == tmp_path


@pytest.mark.usefixtures("real_glue")
@pytest.mark.parametrize(
    ("task", "n_train", "n_dev", "positive_share"),
    [
        ("sst2", 67_349, 872, (0.54, 0.57)),
        ("rte", 2_490, 277, (0.48, 0.52)),  # positive = not_entailment (index 1)
        # This copy of MRPC holds 3,667 training rows (the hub has 3,668; one positive pair is
        # missing here): the count asserts what the file holds.
        ("mrpc", 3_667, 408, (0.66, 0.69)),
        ("cola", 8_551, 1_043, (0.69, 0.72)),
    ],
)
def test_real_glue_files_parse_completely(task, n_train, n_dev, positive_share):
    loaded = load_task(f"glue:{task}", glue_dir=REAL_GLUE)
    assert (len(loaded.train), len(loaded.dev["dev"])) == (n_train, n_dev)
    low, high = positive_share
    for examples, slack in ((loaded.train, 0.0), (loaded.dev["dev"], 0.05)):
        counts = Counter(example.label for example in examples)
        assert set(counts) == {0, 1}
        assert low - slack < counts[1] / len(examples) < high + slack
    assert all(example.text_a for example in loaded.train)
    assert all((example.text_b is None) == (task in ("sst2", "cola")) for example in loaded.train)


@pytest.mark.usefixtures("real_glue")
@pytest.mark.parametrize(
    ("spec", "main_metric", "first"),
    [
        (
            "glue:cola",
            "matthews",
            Example(
                "Our friends won't buy this analysis, let alone the next one we propose.", None, 1
            ),
        ),
        ("glue:SST-2", "accuracy", Example("hide new secretions from the parental units", None, 0)),
        (
            "glue:mrpc",
            "accuracy",
            Example(
                'Amrozi accused his brother , whom he called " the witness " , of deliberately '
                "distorting his evidence .",
                'Referring to him as only " the witness " , Amrozi accused his brother of '
                "deliberately distorting his evidence .",
                1,
            ),
        ),
        (
            "GLUE:RTE",
            "accuracy",
            Example(
                "No Weapons of Mass Destruction Found in Iraq Yet.",
                "Weapons of Mass Destruction Found in Iraq.",
                1,
            ),
        ),
    ],
)
def test_real_glue_tasks(spec, main_metric, first):
    task = load_task(spec, glue_dir=REAL_GLUE)
    assert task.name == "glue:" + spec.split(":")[1].lower().replace("-", "")
    assert task.num_labels == 2 and task.main_metric == main_metric
    assert task.train[0] == first  # CoLA has no header: its first line is an example


# ---------------------------------------------------------------------------------------
# GLUE fixtures for the tasks without data in ../shared: exact header lines of the real files


@pytest.mark.parametrize(
    ("spec", "num_labels", "main_metric", "first"),
    [
        (
            "glue:qqp",
            2,
            "accuracy",
            Example(
                "How do I learn Python quickly?", "What is the fastest way to learn Python?", 1
            ),
        ),
        (
            "glue:sts-b",
            1,
            "combined",
            Example("A plane is taking off.", "An air plane is taking off.", 5.0),
        ),
        (
            "glue:mnli",
            3,
            "accuracy",
            Example(
                "The agency publishes its report every spring.",
                "The report comes out once a year.",
                0,
            ),
        ),
        (
            "glue:qnli",
            2,
            "accuracy",
            Example(
                "When was the bridge completed?",
                "The bridge was completed in 1932 after six years of work.",
                0,
            ),
        ),
        (
            "glue:wnli",
            2,
            "accuracy",
            Example(
                "The trophy doesn't fit into the suitcase because it is too large.",
                "The trophy is too large.",
                1,
            ),
        ),
    ],
)
def test_glue_fixture_tasks(spec, num_labels, main_metric, first):
    task = load_task(spec, glue_dir=FIXTURES)
    assert task.name == "glue:" + spec.split(":")[1].lower().replace("-", "")
    assert task.num_labels == num_labels and task.main_metric == main_metric
    assert task.train[0] == first
    assert len(task.train) == 6
    assert all(len(examples) == 5 for examples in task.dev.values())


@pytest.mark.usefixtures("real_glue")
def test_glue_label_orders_match_the_hub():
    expected = {
        "cola": ("unacceptable", "acceptable"),
        "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"),
        "qqp": ("not_duplicate", "duplicate"),
        "stsb": None,
        "mnli": ("entailment", "neutral", "contradiction"),
        "qnli": ("entailment", "not_entailment"),
        "rte": ("entailment", "not_entailment"),
        "wnli": ("not_entailment", "entailment"),
    }
    for name, label_names in expected.items():
        folder = REAL_GLUE if name in REAL_TASKS else FIXTURES
        assert load_task(f"glue:{name}", glue_dir=folder).label_names == label_names


def test_glue_metrics_and_label_values():
    mnli = load_task("glue:mnli", glue_dir=FIXTURES)
    assert set(mnli.dev) == {"matched", "mismatched"}
    assert [e.label for e in mnli.dev["matched"]] == [0, 2, 1, 0, 2]  # gold_label, not label1
    assert [e.label for e in mnli.dev["mismatched"]] == [0, 2, 1, 0, 1]
    stsb = load_task("glue:stsb", glue_dir=FIXTURES)
    assert stsb.metrics == ("pearson", "spearman")
    assert [e.label for e in stsb.train] == [5.0, 3.8, 0.0, 4.2, 2.75, 0.25]
    assert load_task("glue:qqp", glue_dir=FIXTURES).metrics == ("accuracy", "f1")
    assert [e.label for e in load_task("glue:qnli", glue_dir=FIXTURES).dev["dev"]] == [
        0, 1, 0, 1, 0,
    ]  # fmt: skip


@pytest.mark.usefixtures("real_glue")
def test_real_glue_metrics():
    assert load_task("glue:mrpc", glue_dir=REAL_GLUE).metrics == ("accuracy", "f1")
    assert load_task("glue:cola", glue_dir=REAL_GLUE).metrics == ("matthews",)


def test_glue_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="glue_data layout.*RTE"):
        load_task("glue:rte", glue_dir=tmp_path / "nowhere")
    shutil.copytree(FIXTURES / "MNLI", tmp_path / "MNLI")
    (tmp_path / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="dev_mismatched.tsv.*expected"):
        load_task("glue:mnli", glue_dir=tmp_path)


def test_unknown_tasks_list_the_known_ones():
    with pytest.raises(ValueError, match="known: cola, sst2"):
        load_task("glue:sst3", glue_dir=FIXTURES)
    with pytest.raises(ValueError, match="rotten_tomatoes.*wikipedia_lead"):
        load_task("imdb")


def _qqp_dir(tmp_path: Path, good: int, bad: int) -> Path:
    folder = tmp_path / "QQP"
    folder.mkdir()
    shutil.copy(FIXTURES / "QQP" / "dev.tsv", folder / "dev.tsv")
    lines = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    lines += [
        f"{i}\t{2 * i}\t{2 * i + 1}\tQuestion {i}?\tOther question {i}?\t{i % 2}"
        for i in range(good)
    ]
    lines += [f"{good + i}\t1\t2\tA question cut by a newline" for i in range(bad)]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_malformed_rows_are_skipped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"1 malformed rows of 201.*expected 6"):
        task = load_task("glue:qqp", glue_dir=_qqp_dir(tmp_path, good=200, bad=1))
    assert len(task.train) == 200


def test_too_many_malformed_rows_raise(tmp_path):
    with pytest.raises(ValueError, match=r"3 malformed rows of 100.*more than 1%"):
        load_task("glue:qqp", glue_dir=_qqp_dir(tmp_path, good=97, bad=3))


@pytest.mark.usefixtures("real_glue")
def test_glue_header_without_the_expected_columns(tmp_path):
    shutil.copytree(REAL_GLUE / "RTE", tmp_path / "RTE")
    path = tmp_path / "RTE" / "train.tsv"
    path.write_text(path.read_text().replace("sentence2", "hypothesis", 1))
    with pytest.raises(ValueError, match="missing \\['sentence2'\\]"):
        load_task("glue:rte", glue_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# Hugging Face hub path (datasets.load_dataset replaced by a fake)


class _FakeSplit(list):
    def __init__(self, rows, label_names=None):
        super().__init__(rows)
        label = types.SimpleNamespace(names=label_names) if label_names else None
        self.features = {"label": label} if label else {}


def _install_fake_datasets(monkeypatch, splits):
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return splits

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_glue_from_the_hub(monkeypatch):
    names = ["entailment", "neutral", "contradiction"]
    row = {"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0, "idx": 0}
    splits = {
        "train": _FakeSplit([row, {**row, "label": 2}], names),
        "validation_matched": _FakeSplit([{**row, "label": 1}], names),
        "validation_mismatched": _FakeSplit([row], names),
    }
    calls = _install_fake_datasets(monkeypatch, splits)
    task = load_task("glue:mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert [e.label for e in task.train] == [0, 2]
    assert task.dev["matched"] == (Example("A man sleeps.", "A man rests.", 1),)
    assert set(task.dev) == {"matched", "mismatched"}


def test_hub_label_order_is_checked(monkeypatch):
    rows = [{"sentence1": "a", "sentence2": "b", "label": 0}]
    swapped = ["not_entailment", "entailment"]
    _install_fake_datasets(
        monkeypatch, {"train": _FakeSplit(rows, swapped), "validation": _FakeSplit(rows, swapped)}
    )
    with pytest.raises(ValueError, match="expected label names"):
        load_task("glue:rte")


def test_hub_stsb_scores_are_floats(monkeypatch):
    rows = [{"sentence1": "a b", "sentence2": "a c", "label": 3.5, "idx": 0}]
    _install_fake_datasets(monkeypatch, {"train": _FakeSplit(rows), "validation": _FakeSplit(rows)})
    task = load_task("glue:stsb")
    assert task.train[0].label == 3.5 and task.num_labels == 1


# ---------------------------------------------------------------------------------------
# Deterministic splits and subsets


def test_hash_fraction_is_a_fixed_function_of_the_text():
    assert hash_fraction("senslora") == pytest.approx(0.09314783701934436, abs=0)
    assert all(0.0 <= hash_fraction(str(i)) < 1.0 for i in range(100))


def test_hash_split_keeps_order_and_duplicates_together():
    items = [f"text {i % 50}" for i in range(200)]
    train, dev = hash_split(items, lambda item: item, 0.2)
    assert not set(train) & set(dev)
    assert list(train) == [item for item in items if item in set(train)]
    assert 0.05 < len(dev) / len(items) < 0.4


def test_subsets_are_ordered_deterministic_and_nested():
    items = list(range(100))
    small, large = select_subset(items, 10), select_subset(items, 30)
    assert list(small) == sorted(small) and len(small) == 10
    assert set(small) <= set(large)
    assert select_subset(items, 10) == small
    assert select_subset(items, 10, seed=1) != small
    assert select_subset(items, 500) == tuple(items)
    with pytest.raises(ValueError, match="positive integer"):
        select_subset(items, 0)


def test_load_task_limits_apply_to_train_and_each_dev_split():
    full = load_task("glue:mnli", glue_dir=FIXTURES)
    task = load_task("glue:mnli", glue_dir=FIXTURES, train_limit=3, dev_limit=2)
    assert len(task.train) == 3 and {len(v) for v in task.dev.values()} == {2}
    assert task.train == select_subset(full.train, 3)
    assert load_task("glue:mnli", glue_dir=FIXTURES, train_limit=3).train == task.train


def test_task_validation():
    example = Example("a", None, 0)
    with pytest.raises(ValueError, match="main_metric"):
        ClassificationTask("t", (example,), {"dev": (example,)}, 2, ("accuracy",), "f1", None)
    with pytest.raises(ValueError, match="non-empty dev"):
        ClassificationTask("t", (example,), {"dev": ()}, 2, ("accuracy",), "accuracy", None)
    task = ClassificationTask(
        "t", (example,), {"dev": (example,)}, 1, ("pearson", "spearman"), "combined", None
    )
    assert dataclasses.replace(task, train=(example, example)).kind == "classification"


# ---------------------------------------------------------------------------------------
# Local CSV / JSONL classification


def test_csv_with_string_labels_and_a_dev_file(tmp_path):
    (tmp_path / "reviews.csv").write_text(
        'text,label\n"Great, really great",pos\nAwful,neg\nFine I guess,meh\n'
    )
    (tmp_path / "reviews.dev.csv").write_text("text,label\nNot bad,pos\nTerrible,neg\n")
    task = load_task(f"csv:{tmp_path / 'reviews.csv'}")
    assert task.label_names == ("meh", "neg", "pos") and task.num_labels == 3
    assert task.train[0] == Example("Great, really great", None, 2)
    assert task.dev["dev"] == (Example("Not bad", None, 2), Example("Terrible", None, 1))
    assert task.metrics == ("accuracy",)


def test_jsonl_pairs_with_integer_labels_and_a_hash_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"question {i}", "a": f"answer {i}", "y": i % 2} for i in range(60)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = load_task(f"jsonl:{path}", text_field="q,a", label_field="y")
    assert task.num_labels == 2 and task.label_names is None
    assert task.metrics == ("accuracy", "f1")
    assert len(task.train) + len(task.dev["dev"]) == 60 and task.dev["dev"]
    assert task.train[0].text_b.startswith("answer")
    assert load_task(f"jsonl:{path}", text_field="q,a", label_field="y") == task


def test_dev_file_named_dev_next_to_train(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n'
    )
    (tmp_path / "dev.jsonl").write_text('{"sentence": "okay", "label": 1}\n')
    task = load_task(f"jsonl:{tmp_path / 'train.jsonl'}")
    assert task.dev["dev"] == (Example("okay", None, 1),)


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_task(f"csv:{tmp_path / 'missing.csv'}")
    (tmp_path / "data.csv").write_text("review,label\nnice,1\nbad,0\n")
    with pytest.raises(ValueError, match="'text' or 'sentence'.*review"):
        load_task(f"csv:{tmp_path / 'data.csv'}")
    with pytest.raises(ValueError, match="ending in .jsonl"):
        load_task(f"jsonl:{tmp_path / 'data.csv'}")
    (tmp_path / "tiny.csv").write_text("text,label\nnice,1\nbad,0\n")  # 10% of 2 rows: none
    with pytest.raises(ValueError, match="0 dev items.*tiny.dev.csv"):
        load_task(f"csv:{tmp_path / 'tiny.csv'}")


def test_local_malformed_jsonl_line_is_skipped(tmp_path):
    path, dev = tmp_path / "data.jsonl", tmp_path / "data.dev.jsonl"
    lines = [json.dumps({"text": f"text {i}", "label": i % 2}) for i in range(150)]
    path.write_text("\n".join([*lines[:70], "{not json", *lines[70:]]) + "\n")
    dev.write_text(lines[0] + "\n")
    with pytest.warns(UserWarning, match=r"1 malformed rows of 151.*line 71"):
        task = load_task(f"jsonl:{path}")
    assert len(task.train) == 150


# ---------------------------------------------------------------------------------------
# Generation: instruction JSONL, wikipedia_lead


def test_instruction_jsonl(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a primary colour.", "response": "Blue"},
    ]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "tasks.dev.jsonl").write_text(json.dumps(rows[1]) + "\n")
    task = load_task(f"gen:{tmp_path / 'tasks.jsonl'}")
    assert isinstance(task, GenerationTask) and task.main_metric == "rougeL"
    assert task.train[0] == GenerationExample("Translate to French.\nGood morning", "Bonjour")
    assert task.dev["dev"] == (GenerationExample("Name a primary colour.", "Blue"),)


@pytest.mark.parametrize(
    ("paragraph", "first"),
    [
        ("Dr. Smith arrived in 1901. He left soon.", "Dr. Smith arrived in 1901."),
        ("J. R. R. Tolkien was born in 1892. He wrote.", "J. R. R. Tolkien was born in 1892."),
        ("The U.S. Army was there. So was the navy.", "The U.S. Army was there."),
        ('He said "Stop!" Then he ran.', 'He said "Stop!"'),
        ("It rose in c. 1200 CE. Then fell.", "It rose in c. 1200 CE."),
    ],
)
def test_split_first_sentence(paragraph, first):
    assert split_first_sentence(paragraph)[0] == first


def test_split_first_sentence_of_one_sentence():
    assert split_first_sentence("Only one sentence here.") is None
    assert split_first_sentence("Version 2.5 is out now") is None


def test_wikipedia_lead_splits_by_article():
    task = load_task("wikipedia_lead")
    dev = task.dev["dev"]
    assert (len(task.train), len(dev)) == (2888, 1039)
    for example in task.train + dev:
        assert example.prompt.startswith(LEAD_INSTRUCTION)
        assert 8 <= len(example.response.split()) <= 40
        assert 10 <= len(example.prompt[len(LEAD_INSTRUCTION) :].split()) <= 80
    articles = read_wikipedia_articles()
    dev_titles = {title for title in dict(articles) if hash_fraction(title) < 0.2}
    train_text = "\n".join(text for title, text in articles if title not in dev_titles)
    assert not any(example.response in train_text for example in dev[::20])


def test_rotten_tomatoes_fixed_split():
    task = load_task("rotten_tomatoes")
    dev = task.dev["dev"]
    assert (len(task.train), len(dev)) == (10_314, 2_494)
    assert len(task.train) + len(dev) == 12_808
    assert task.label_names == ("rotten", "fresh")
    assert sum(e.label for e in task.train + dev) == 7_403  # fresh snippets
    assert not {e.text_a for e in task.train} & {e.text_a for e in dev}
    limited = load_task("rotten_tomatoes", train_limit=100, dev_limit=50)
    assert len(limited.train) == 100 and len(limited.dev["dev"]) == 50
