"""Tables of a grid's finished runs (pure functions over their results.json): mean ± std per
row and task, paired differences to the references with Holm's correction, the questions'
answers, and their markdown."""

from __future__ import annotations

import statistics
from typing import Any

from senslora.finetune.paired import holm, paired_summary

LOWER_IS_BETTER = {"nll", "perplexity", "mse"}
"""Metrics where smaller is better; every other metric is reported in percent, higher better."""
UNTUNED = "untuned"


def score(result: dict[str, Any], selection: str, metric: str | None = None) -> float:
    """A dev metric of a run at its last or best epoch (``selection``): the task's main metric
    unless ``metric`` names another, in percent unless it is a loss (`LOWER_IS_BETTER`)."""
    metric = metric or result["main_metric"]
    row = result[selection]
    if metric not in row:
        have = sorted(set(row) - {"step", "epoch"})
        raise ValueError(f"the run's evaluations have no {metric!r}; they have {have}")
    value = float(row[metric])
    return value if metric in LOWER_IS_BETTER else 100.0 * value


def spec_task(result: dict[str, Any]) -> str:
    """The task as the spec names it (``wordnet:<path>``), not the task's short name."""
    return result["config"].get("task", result["task"])


def untuned_results(results: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """The step-0 evaluations of the reference's runs, as runs of an ``untuned`` row."""
    return [
        {
            **r,
            "row": UNTUNED,
            "last": r["evals"][0],
            "best": r["evals"][0],
            "parameters": {"lora": 0},  # nothing trained yet
        }
        for r in results
        if r["row"] == reference and r.get("evals") and r["evals"][0].get("step") == 0
    ]


def adapter_parameters(result: dict[str, Any]) -> int:
    """Trainable adapter parameters of a run: the LoRA factors, plus the hypernetwork that
    generates them for hyperadalora (the classification head, the same for all, excluded)."""
    parameters = result["parameters"]
    return int(parameters["lora"]) + int(parameters.get("hypernetwork", 0))


def saved_parameters(result: dict[str, Any]) -> int:
    """Parameters of the adapter a run saves: AdaLoRA's after pruning, HyperAdaLoRA's factors
    once generated (``final_lora``); the trained count for every other method."""
    parameters = result["parameters"]
    return int(parameters.get("final_lora", adapter_parameters(result)))


def aggregate(
    results: list[dict[str, Any]],
    methods,
    tasks,
    selection="last",
    references=("lora",),
    metric: str | None = None,
) -> dict[str, Any]:
    """Mean ± std over seeds per method (row) and task, the average over tasks, and each
    method's paired (same seed) difference to each reference: mean, 95% interval, paired t-test
    p (and Holm-corrected over the tasks), seeds won (`senslora.finetune.paired`). A result's
    ``row`` (default: its method) names its row. ``metric``: see `score`; "won" means lower for
    a loss. An ``untuned`` row comes first when the first reference has step-0 evaluations."""
    results = [{**r, "row": r.get("row", r["method"])} for r in results]
    untuned = untuned_results(results, references[0]) if references else []
    if untuned:
        methods = [UNTUNED, *methods]
        results = untuned + results
    by = by_run(results)
    lower = metric in LOWER_IS_BETTER
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        row: dict[str, Any] = {}
        for task in tasks:
            runs = [r for (m, t, _), r in by.items() if m == method and t == task]
            row[task] = _summary([score(r, selection, metric) for r in runs])
            counts = sorted(adapter_parameters(r) for r in runs)
            row[task]["params"] = adapter_parameters(runs[0]) if runs else None
            # the allocation, hence the count, may differ with the seed's calibration sample
            row[task]["params_range"] = [counts[0], counts[-1]] if runs else None
            saved = sorted(saved_parameters(r) for r in runs)
            row[task]["saved_range"] = [saved[0], saved[-1]] if runs else None
        complete = [row[t]["mean"] for t in tasks if row[t]["n"]]
        row["average"] = {
            "mean": statistics.fmean(complete) if len(complete) == len(tasks) else None,
            "tasks": len(complete),
        }
        for reference in references:
            if method != reference:
                _compare(row, by, method, reference, tasks, selection, metric)
        table[method] = row
    trained = [key for key in by if key[0] != UNTUNED]
    checked = [key for key in trained if by[key].get("stalled") is not None]
    return {
        "stalled": (
            sorted(f"{m} / {t} / seed {s}" for (m, t, s) in checked if by[(m, t, s)]["stalled"])
            if checked
            else None
        ),
        "stall_checked": [len(checked), len(trained)],
        "selection": selection,
        "metric": metric or "main",
        "lower_is_better": lower,
        "methods": list(methods),
        "tasks": list(tasks),
        "references": list(references),
        "table": table,
    }


def by_run(results: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """``{(row, task, seed): result}``; a result's row defaults to its method."""
    return {(r.get("row", r["method"]), spec_task(r), r["config"]["seed"]): r for r in results}


SIGNIFICANCE = 0.05
"""The level of the questions' tests, after Holm's correction over the questions."""


def answer_questions(
    results: list[dict[str, Any]],
    questions: dict[str, tuple[str, str]],
    tasks,
    selection: str = "last",
    metric: str | None = None,
) -> list[dict[str, Any]]:
    """Each question "does method beat reference?" answered from the paired differences.

    The test of a question is the paired t-test of the task-averaged difference (per seed that
    both sides ran on every task, the mean over the tasks of method − reference), its p-value
    Holm-corrected over the questions (the family). The answer is "yes" when the corrected p is
    below `SIGNIFICANCE` and the mean difference favours the method, "no, the reverse" when it
    favours the reference, "no detectable difference" otherwise, and "not answered" below two
    such seeds. The per-task differences (Holm over the tasks) come with it."""
    by = by_run(results)
    lower = metric in LOWER_IS_BETTER
    answers = []
    for question, (method, reference) in questions.items():
        row: dict[str, Any] = {task: {} for task in tasks} | {"average": {}}
        _compare(row, by, method, reference, tasks, selection, metric)
        key = f"diff_vs_{reference}"
        answers.append(
            {
                "question": question,
                "method": method,
                "reference": reference,
                "tasks": {task: row[task][key] for task in tasks},
                "average": row["average"][key],
            }
        )
    adjusted = holm({str(i): a["average"]["p"] for i, a in enumerate(answers)})
    for i, entry in enumerate(answers):
        average = entry["average"]
        average["p_holm"] = adjusted[str(i)]
        entry["answer"] = _answer(entry["method"], entry["reference"], average, lower)
    return answers


def _answer(method: str, reference: str, average: dict[str, Any], lower: bool) -> str:
    n, p = average["n"], average.get("p_holm")
    if n < 2:
        return f"not answered: {n} seed(s) with every task"
    if p is None or p >= SIGNIFICANCE:
        return f"no detectable difference (n = {n})"
    favours_method = (average["mean"] < 0) if lower else (average["mean"] > 0)
    winner, loser = (method, reference) if favours_method else (reference, method)
    return f"{'yes' if favours_method else 'no'}: {winner} beats {loser} (n = {n})"


def render_questions(answers: list[dict[str, Any]], tasks, lower_is_better: bool = False) -> str:
    """The questions' table: the answer, the averaged difference and each task's."""
    digits = _digits(lower_is_better)
    lines = [
        "Each question compares two rows seed by seed (method − reference; per task: mean [95% "
        "interval], p Holm-corrected over the tasks, seeds won / n). The answer tests the "
        f"task-averaged difference, Holm-corrected over the {len(answers)} questions, at "
        f"{SIGNIFICANCE}.",
        "",
        "| question | answer | Avg. | " + " | ".join(tasks) + " |",
        "|" + "---|" * (len(tasks) + 3),
    ]
    for entry in answers:
        cells = [_paired_cell(entry["average"], digits)]
        cells += [_paired_cell(entry["tasks"][task], digits) for task in tasks]
        pair = f"{entry['method']} vs {entry['reference']}"
        lines.append(
            f"| {entry['question']} ({pair}) | {entry['answer']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _compare(
    row: dict, by: dict, method: str, reference: str, tasks, selection: str, metric=None
) -> None:
    """``row[task]["diff_vs_<reference>"]`` for every task, Holm-corrected over the tasks."""
    key = f"diff_vs_{reference}"
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    for task in tasks:
        diffs = seed_differences(by, method, reference, task, selection, metric)
        row[task][key] = paired_summary(list(diffs.values()), better=better)
    adjusted = holm({task: row[task][key]["p"] for task in tasks})
    for task in tasks:
        row[task][key]["p_holm"] = adjusted[task]
    averaged = average_differences(by, method, reference, tasks, selection, metric)
    row["average"][key] = paired_summary(list(averaged.values()), better=better)
    row["average"][key]["p_holm"] = row["average"][key]["p"]  # a family of one test


def seed_differences(
    by: dict, method: str, reference: str, task: str, selection: str, metric=None
) -> dict[int, float]:
    """``{seed: method − reference}`` on one task, for every seed both ran, in seed order
    (``by``: `by_run`)."""
    return {
        s: score(r, selection, metric) - score(by[(reference, task, s)], selection, metric)
        for (m, t, s), r in sorted(by.items(), key=lambda item: item[0][2])
        if m == method and t == task and (reference, task, s) in by
    }


def average_differences(
    by: dict, method: str, reference: str, tasks, selection: str, metric=None
) -> dict[int, float]:
    """``{seed: the mean over the tasks of method − reference}`` for every seed that both sides
    ran on every task (the paired difference of the task-averaged scores), in seed order."""
    per_task = [seed_differences(by, method, reference, t, selection, metric) for t in tasks]
    seeds = sorted(set.intersection(*(set(d) for d in per_task))) if per_task else []
    return {s: statistics.fmean(d[s] for d in per_task) for s in seeds}


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": statistics.fmean(values), "std": std}


def render_markdown(summary: dict[str, Any]) -> str:
    tasks, table = summary["tasks"], summary["table"]
    head = "| method | " + " | ".join(tasks) + " | Avg. | adapter params (trained) |"
    metric = summary.get("metric", "main")
    name = "the main dev metric" if metric == "main" else f"dev {metric}"
    direction = "lower is better" if summary.get("lower_is_better") else "higher is better"
    lines = [
        f"{name[0].upper() + name[1:]} ({summary['selection']} epoch; {direction}), "
        "mean ± std over seeds (n = seeds).",
        "",
        head,
        "|" + "---|" * (len(tasks) + 3),
    ]
    digits = _digits(summary.get("lower_is_better", False))
    for method, row in table.items():
        cells = [_cell(row[t], digits=digits) for t in tasks]
        average = row["average"]["mean"]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {'-' if average is None else f'{average:.{digits}f}'} | "
            + _params_cell([row[t].get("params_range") for t in tasks])
            + _saved_note(
                [row[t].get("params_range") for t in tasks],
                [row[t].get("saved_range") for t in tasks],
            )
            + " |"
        )
    if summary.get("stalled") is not None:
        from senslora.finetune.results import STALL_TOLERANCE

        lines += [
            "",
            f"Stalled runs (the last training loss within {STALL_TOLERANCE:.0%} of the label "
            "prior's: nothing learnt beyond the label frequencies; "
            f"{summary['stall_checked'][0]} of {summary['stall_checked'][1]} runs checked): "
            + (", ".join(summary["stalled"]) or "none")
            + ".",
        ]
    for reference in summary.get("references", ["lora"]):
        lines += _paired_lines(summary, reference)
    return "\n".join(lines) + "\n"


def _paired_lines(summary: dict[str, Any], reference: str) -> list[str]:
    tasks, table = summary["tasks"], summary["table"]
    lines = [
        "",
        f"Paired difference to `{reference}` (same seed): mean [95% interval], paired t-test p "
        "Holm-corrected over the tasks, seeds won / n"
        + (" (won: lower)" if summary.get("lower_is_better") else "")
        + "; Avg.: per seed, the mean over the tasks (seeds with every task; one test, "
        "uncorrected):",
        "",
        "| method | " + " | ".join(tasks) + " | Avg. |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    digits = _digits(summary.get("lower_is_better", False))
    for method, row in table.items():
        if method not in (reference, UNTUNED):
            cells = [
                _paired_cell(row[t].get(f"diff_vs_{reference}", {"n": 0}), digits) for t in tasks
            ]
            cells.append(_paired_cell(row["average"].get(f"diff_vs_{reference}", {"n": 0}), digits))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _digits(lower_is_better: bool) -> int:
    """Decimals of a table's cells: a loss differs in the third digit, a percentage in the
    second."""
    return 3 if lower_is_better else 2


def _paired_cell(stats: dict[str, Any], digits: int = 2) -> str:
    if not stats.get("n"):
        return "-"
    text = f"{stats['mean']:+.{digits}f}"
    if stats.get("ci95") is not None:
        low, high = stats["ci95"]
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    if stats.get("p_holm") is not None:
        text += f", p {stats['p_holm']:.3f}"
    elif stats.get("no_spread"):
        text += ", p n/a (no spread)"
    return text + f", {stats['wins']}/{stats['n']}"


def _params_cell(ranges: list[list[int] | None]) -> str:
    """Adapter parameters over every task and seed: one count, or the smallest–largest."""
    counts = [count for r in ranges if r for count in r]
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _saved_note(trained: list, saved: list) -> str:
    """`` (saves A–B)`` when the saved adapter differs from what was trained, else empty."""
    if [r for r in saved if r] == [r for r in trained if r]:
        return ""
    return f" (saves {_params_cell(saved)})"


def _cell(stats: dict[str, Any], signed: bool = False, digits: int = 2) -> str:
    if not stats.get("n"):
        return "-"
    sign = "+" if signed else ""
    mean, std = stats["mean"], stats["std"]
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f} ({stats['n']})"
