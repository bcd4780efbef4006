"""Bench specs with named rows and a chosen metric, and the tables built from them: rows carry
their own TrainConfig fields, a loss is won by going lower, and the step-0 evaluation of the
reference becomes the `untuned` row."""

from __future__ import annotations

import os

import pytest
from scipy import stats

from senslora.finetune.grid import load_spec
from senslora.finetune.paired import paired_summary
from senslora.finetune.tables import (
    aggregate,
    answer_questions,
    render_markdown,
    render_questions,
)

SPEC = """
out = "grid"
methods = ["lora", "senslora", "senslora-filtered"]
tasks = ["glue:rte"]
seeds = [0, 1, 2]
metric = "nll"
[rows.lora]
method = "lora"
eval_at_start = true
[rows.senslora-filtered]
method = "senslora"
outlier_factor = 10.0
[defaults]
avg_rank = 2
"""


def write(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_a_row_is_a_method_with_its_own_fields(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    filtered = spec.config("glue:rte", "senslora-filtered", 1)
    plain = spec.config("glue:rte", "senslora", 1)
    assert (filtered.method, filtered.outlier_factor, filtered.avg_rank) == ("senslora", 10.0, 2)
    assert (plain.method, plain.outlier_factor) == ("senslora", None)
    assert spec.config("glue:rte", "lora", 0).eval_at_start
    assert not plain.eval_at_start
    assert spec.run_dir("glue:rte", "senslora-filtered", 1).parts[-2:] == (
        "senslora-filtered",
        "seed1",
    )
    assert spec.metric == "nll"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('method = "senslora"\n', ""), r"\[rows.senslora-filtered\] needs"),
        (
            lambda t: t.replace("outlier_factor", "outlier"),
            r"\[rows.senslora-filtered\] has unknown",
        ),
        (lambda t: t.replace('"senslora-filtered"]', '"untuned"]'), "'untuned' is the name of"),
        (lambda t: t.replace('metric = "nll"', "metric = 3"), "metric must be a metric's name"),
        (lambda t: t.replace('method = "senslora"\n', 'method = "sens"\n'), "method must be one"),
        (
            lambda t: t + '[questions]\n"Better?" = ["senslora-filtered", "adalora"]\n',
            r"question 'Better\?' needs two of the methods",
        ),
    ],
    ids=[
        "row-without-method",
        "row-unknown-field",
        "reserved-name",
        "metric-type",
        "bad-method",
        "question-method",
    ],
)
def test_row_errors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_spec(write(tmp_path, edit(SPEC)))


def run(row, seed, nll, rouge, start=None):
    evals = [{"step": 10, "nll": nll, "rougeL": rouge}]
    if start is not None:
        evals.insert(0, {"step": 0, "nll": start, "rougeL": 0.1})
    final = {"nll": nll, "rougeL": rouge}
    return {
        "row": row,
        "method": "senslora" if row.startswith("senslora") else "lora",
        "task": "t",
        "main_metric": "rougeL",
        "config": {"seed": seed},
        "parameters": {"lora": 100},
        "evals": evals,
        "last": final,
        "best": final,
    }


RESULTS = [
    run("lora", 0, 3.0, 0.20, start=4.8),
    run("lora", 1, 3.1, 0.21, start=4.8),
    run("lora", 2, 3.2, 0.19, start=4.8),
    run("senslora-filtered", 0, 2.9, 0.18),
    run("senslora-filtered", 1, 3.0, 0.19),
    run("senslora-filtered", 2, 3.3, 0.22),
]


def test_a_loss_table_is_won_by_going_lower_and_has_the_untuned_row():
    summary = aggregate(RESULTS, ["lora", "senslora-filtered"], ["t"], metric="nll")
    assert summary["methods"] == ["untuned", "lora", "senslora-filtered"]
    assert summary["lower_is_better"]
    table = summary["table"]
    assert table["untuned"]["t"]["n"] == 3 and table["untuned"]["t"]["mean"] == pytest.approx(4.8)
    assert table["lora"]["t"]["mean"] == pytest.approx(3.1)  # a loss: not in percent
    diff = table["senslora-filtered"]["t"]["diff_vs_lora"]
    assert diff["mean"] == pytest.approx((-0.1 - 0.1 + 0.1) / 3)
    assert diff["wins"] == 2  # seeds 0 and 1 have the lower loss
    text = render_markdown(summary)
    assert "lower is better" in text and "(won: lower)" in text
    assert "| untuned | 4.800 ± 0.000 (3) | 4.800 | 0 |" in text


def test_the_main_metric_stays_the_default_and_is_won_by_going_higher():
    summary = aggregate(RESULTS, ["lora", "senslora-filtered"], ["t"])
    table = summary["table"]
    assert not summary["lower_is_better"]
    assert table["lora"]["t"]["mean"] == pytest.approx(20.0)  # percent
    assert table["untuned"]["t"]["mean"] == pytest.approx(10.0)
    assert table["senslora-filtered"]["t"]["diff_vs_lora"]["wins"] == 1  # seed 2 only


def test_a_missing_metric_names_what_the_runs_have():
    with pytest.raises(ValueError, match=r"no 'bleu4'; they have \['nll', 'rougeL'\]"):
        aggregate(RESULTS, ["lora"], ["t"], metric="bleu4")


def test_paired_summary_counts_wins_in_the_chosen_direction():
    assert paired_summary([-1.0, 2.0, -3.0])["wins"] == 1
    assert paired_summary([-1.0, 2.0, -3.0], better="lower")["wins"] == 2
    with pytest.raises(ValueError, match="better must be 'higher' or 'lower', got 'up'"):
        paired_summary([1.0], better="up")


def test_a_run_is_claimed_once_and_a_dead_claim_is_taken_over(tmp_path):
    import subprocess
    import sys

    from senslora.finetune.grid import LOCK, claim

    run_dir = tmp_path / "task" / "lora" / "seed0"
    assert claim(run_dir)
    assert (run_dir / LOCK).read_text() == str(os.getpid())
    assert not claim(run_dir)  # held by a live process (this one)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (run_dir / LOCK).write_text(dead.stdout.strip())  # that process has exited
    assert claim(run_dir)
    assert (run_dir / LOCK).read_text() == str(os.getpid())


def test_the_table_shows_a_pruned_adapter_s_saved_size_beside_its_trained_size():
    pruned = [
        {**run("lora", seed, 3.0, 0.2), "parameters": {"lora": 249048, "final_lora": saved}}
        for seed, saved in ((0, 139392), (1, 154368))
    ]
    text = render_markdown(aggregate(pruned, ["lora"], ["t"]))
    assert "| 249,048 (saves 139,392–154,368) |" in text
    plain = render_markdown(aggregate(RESULTS, ["lora"], ["t"]))
    assert "| 100 |" in plain and "saves" not in plain


def test_write_summary_adds_a_table_per_further_metric(tmp_path):
    import json

    from senslora.finetune.grid import write_summary

    spec = load_spec(
        write(tmp_path, SPEC.replace('metric = "nll"', 'metric = "nll"\nalso = ["rougeL"]'))
    )
    for result in RESULTS:
        folder = spec.run_dir("glue:rte", result["row"], result["config"]["seed"])
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({**result, "task": "glue:rte"}))
    write_summary(spec)
    text = (spec.out / "results.md").read_text()
    assert "## rougeL (last epoch)" in text and "Dev nll (last epoch; lower is better)" in text
    saved = json.loads((spec.out / "results.json").read_text())
    rouge = saved["also"]["rougeL"]["table"]
    assert rouge["lora"]["glue:rte"]["mean"] == pytest.approx(20.0)
    assert saved["main"]["table"]["lora"]["glue:rte"]["mean"] == pytest.approx(3.1)
    with pytest.raises(ValueError, match="also must be a list of metric names"):
        load_spec(write(tmp_path, SPEC.replace('metric = "nll"', "also = [1]")))


def test_bench_status_counts_finished_running_and_left_runs_and_estimates_the_time(tmp_path):
    import json
    import subprocess
    import sys

    from senslora.finetune.grid import LOCK, bench_status

    spec = load_spec(write(tmp_path, SPEC))  # 3 rows x 1 task x 3 seeds
    status = bench_status(spec)
    assert (status["total"], status["finished"], len(status["to_do"])) == (9, 0, 9)
    assert status["estimated_seconds_left"] is None  # nothing finished: no estimate

    for seed, wall in ((0, 100.0), (1, 300.0)):
        run_dir = spec.run_dir("glue:rte", "lora", seed)
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"wall_seconds": wall}))
    held = spec.run_dir("glue:rte", "senslora", 0)
    held.mkdir(parents=True)
    (held / LOCK).write_text(str(os.getpid()))  # a live process runs it
    dead = spec.run_dir("glue:rte", "senslora", 1)
    dead.mkdir(parents=True)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (dead / LOCK).write_text(gone)  # its process has exited: the run is still to do

    status = bench_status(spec)
    assert status["finished"] == 2
    assert status["running"] == [["glue:rte", "senslora", 0, os.getpid()]]
    assert ["glue:rte", "senslora", 1] in status["to_do"] and len(status["to_do"]) == 6
    assert status["median_wall_seconds"] == {"glue:rte": 200.0}
    assert status["estimated_seconds_left"] == 7 * 200.0


def test_seeds_that_all_differ_by_the_same_amount_get_no_p_value():
    # rougeL 0.20/0.21 for lora, 0.19/0.20 for the other row: both seeds differ by -1 point
    results = [run("lora", 0, 3.0, 0.20), run("lora", 1, 3.0, 0.21)]
    results += [run("senslora-filtered", 0, 3.0, 0.19), run("senslora-filtered", 1, 3.0, 0.20)]
    summary = aggregate(results, ["lora", "senslora-filtered"], ["t"])
    diff = summary["table"]["senslora-filtered"]["t"]["diff_vs_lora"]
    assert diff["mean"] == pytest.approx(-1.0) and diff["p_holm"] is None
    assert "-1.00, p n/a (no spread), 0/2" in render_markdown(summary)


def test_questions_are_answered_by_the_averaged_difference_holm_corrected_over_questions():
    scores = {  # rougeL per seed on tasks a and b
        "lora": ([0.50, 0.52, 0.51, 0.49], [0.60, 0.61, 0.59, 0.62]),
        "big": ([0.60, 0.63, 0.60, 0.60], [0.70, 0.70, 0.71, 0.71]),  # ~ +10 points on both
        "noisy": ([0.55, 0.47, 0.56, 0.45], [0.58, 0.66, 0.57, 0.64]),
    }
    results = []
    for row, per_task in scores.items():
        for task, values in zip("ab", per_task, strict=True):
            for seed, value in enumerate(values):
                result = run(row, seed, 3.0, value)
                results.append({**result, "task": task})
    questions = {"Big?": ("big", "lora"), "Noisy?": ("noisy", "lora"), "Lora?": ("lora", "big")}
    answers = answer_questions(results, questions, ["a", "b"])
    by = {a["question"]: a for a in answers}
    averaged = {
        q: [sum(100 * (scores[m][t][s] - scores[r][t][s]) for t in (0, 1)) / 2 for s in range(4)]
        for q, (m, r) in questions.items()
    }
    raw = {q: stats.ttest_1samp(d, 0.0).pvalue for q, d in averaged.items()}
    ordered = sorted(raw, key=raw.get)  # Holm by hand: 3, 2, 1 times the sorted p-values
    expected = {}
    for i, q in enumerate(ordered):
        expected[q] = min(1.0, max([(3 - i) * raw[q]] + [expected[o] for o in ordered[:i]]))
    for q in questions:
        assert by[q]["average"]["p_holm"] == pytest.approx(expected[q])
        assert by[q]["average"]["mean"] == pytest.approx(sum(averaged[q]) / 4)
    assert by["Big?"]["answer"] == "yes: big beats lora (n = 4)"
    assert by["Lora?"]["answer"] == "no: big beats lora (n = 4)"
    assert by["Noisy?"]["answer"] == "no detectable difference (n = 4)"
    assert by["Big?"]["tasks"]["a"]["wins"] == 4
    text = render_questions(answers, ["a", "b"])
    assert "| Big? (big vs lora) | yes: big beats lora (n = 4) |" in text


def test_a_question_with_one_complete_seed_is_not_answered():
    results = [run("lora", 0, 3.0, 0.2), run("senslora-filtered", 0, 3.0, 0.3)]
    (entry,) = answer_questions(results, {"Q": ("senslora-filtered", "lora")}, ["t"])
    assert entry["answer"] == "not answered: 1 seed(s) with every task"


def test_the_table_names_the_stalled_runs_when_the_runs_were_checked():
    checked = [
        {**run("lora", 0, 3.0, 0.2), "stalled": False},
        {**run("lora", 1, 3.0, 0.2), "stalled": True},
        {**run("senslora-filtered", 0, 3.0, 0.2), "stalled": None},  # e.g. AdaLoRA: not checked
    ]
    summary = aggregate(checked, ["lora", "senslora-filtered"], ["t"])
    assert summary["stalled"] == ["lora / t / seed 1"]
    assert "2 of 3 runs checked): lora / t / seed 1." in render_markdown(summary)
    unchecked = aggregate(RESULTS, ["lora", "senslora-filtered"], ["t"])  # older results.json
    assert unchecked["stalled"] is None and "Stalled" not in render_markdown(unchecked)
