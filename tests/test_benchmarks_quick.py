"""Every benchmark's --quick mode runs end to end and writes its JSON (a smoke test: benchmarks
are not tests, so no timing is asserted here)."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ENVIRONMENT_KEYS = {"date", "device", "torch", "cpu_count", "torch_threads", "peft"}


def run_quick(name: str, out: Path, monkeypatch) -> dict:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [name, "--quick", "--out", str(out)])
    runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="__main__")
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == name
    assert payload["config"]["quick"] is True
    assert ENVIRONMENT_KEYS <= set(payload["environment"])
    return payload


@pytest.mark.real_model
def test_allocation_overhead_quick(tmp_path, monkeypatch):
    payload = run_quick("allocation_overhead", tmp_path / "out.json", monkeypatch)
    for model in payload["models"]:
        timings = model["activation"]["timings"]
        assert set(timings) == {
            "forward",
            "forward_regrouped",
            "senslora",
            "senslora_grouped",  # the reduction a GPU uses, timed on the CPU for comparison
            "senslora_full_forward",
        }
        assert timings["senslora"]["wall"]["ratio_paired_median"] > 0
        reduction = model["activation"]["reduction"]
        assert (reduction["default"], reduction["other"]) == ("per_input", "grouped")
        assert reduction["other_vs_default"] > 0
        assert set(model["gradient"]["timings"]) == {"forward", "fisher", "hutchinson"}


@pytest.mark.real_model
def test_eva_comparison_quick(tmp_path, monkeypatch):
    payload = run_quick("eva_comparison", tmp_path / "out.json", monkeypatch)
    converged = [m["eva_converged"] for m in payload["models"]]
    assert converged == [True, False]  # tiny-bert runs to convergence, tiny-llama is capped
    for model in payload["models"]:
        assert model["senslora_total_rank"] == model["rank_budget"]
        if model["eva_converged"]:
            assert model["eva_total_rank"] == model["rank_budget"]


@pytest.mark.real_model
def test_training_cost_quick(tmp_path, monkeypatch):
    payload = run_quick("training_cost", tmp_path / "out.json", monkeypatch)
    for model in payload["models"]:
        methods = model["methods"]
        assert set(methods) == {"lora", "senslora", "senslora_params", "adalora"}
        assert methods["senslora"]["total_rank"] == methods["lora"]["total_rank"]
        assert (
            methods["senslora_params"]["adapter_parameters"]
            <= methods["lora"]["adapter_parameters"]
        )
        for entry in methods.values():
            assert entry["median_step_s"] > 0 and "peak_growth_bytes" in entry["memory"]


@pytest.mark.real_model
def test_scaling_quick(tmp_path, monkeypatch):
    payload = run_quick("scaling", tmp_path / "out.json", monkeypatch)
    assert payload["calibration_size"]["statistics_bytes_constant"]
    assert payload["model_size"]["statistics_bytes_equal_4_sum_d_in"]
    # the docs' figure is drawn from results of this shape
    monkeypatch.setattr(
        sys,
        "argv",
        ["plot", "--scaling", str(tmp_path / "out.json"), "--out", str(tmp_path / "s.png")],
    )
    runpy.run_path(str(BENCHMARKS / "plot_performance.py"), run_name="__main__")
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.real_model
def test_dispatch_count_quick(tmp_path, monkeypatch):
    payload = run_quick("dispatch_count", tmp_path / "out.json", monkeypatch)
    for model in payload["models"]:
        per_batch, ops = model["per_batch"], model["statistics_ops_per_batch"]
        assert per_batch["forward"] > 0
        # per batch: one copy per distinct input (q/k/v share it), then one reduction per input
        # width (hidden, intermediate): cat, square, sum, accumulate
        copies = ops.get("index_select", 0) + ops.get("clone", 0)
        assert 0 < copies < model["targets"]
        assert ops["index_add_"] == ops["square_"] == 2
        assert "add_" not in ops  # no per-module accumulation
        assert per_batch["hooks"] <= copies + 4 * ops["index_add_"]
        # reducing every input on its own (the CPU's way): one reduction per copy
        alone = model["statistics_per_input_ops_per_batch"]
        assert alone["index_add_"] == alone["square_"] == copies
        assert per_batch["hooks"] < per_batch["hooks_per_input"]
        assert model["metrics_and_ranks"] <= 3 * model["targets"]  # no per-value torch calls


@pytest.mark.real_model
def test_decoder_diagnosis_quick(tmp_path, monkeypatch):
    payload = run_quick("decoder_diagnosis", tmp_path / "out.json", monkeypatch)
    assert (tmp_path / "out.png").is_file()
    result = payload["models"]["tiny-llama"]
    shares = result["diagnosis"]["down_proj"].values()
    assert len(shares) == 2  # one row per layer of the tiny Llama
    for row in shares:
        assert 0 < row["first_token_share"] < 1 and 0 < row["top_channel_share"] < 1
    allocations = result["allocations"]  # the rank budget
    assert len(allocations) == 4
    for allocation in allocations.values():  # 2 layers x 7 matrices at average rank 8
        assert sum(allocation["ranks"].values()) == 14 * 8
        assert 0 < allocation["top3_share"] <= 1
    assert allocations["default"]["spearman_to_default"] == pytest.approx(1.0)
    by_parameters = result["allocations_parameters"]
    assert by_parameters.keys() == allocations.keys()
    for allocation in by_parameters.values():
        assert 0.9 * allocation["uniform_parameters"] <= allocation["parameters"]
        assert allocation["parameters"] <= allocation["uniform_parameters"]
        assert 0 < allocation["top3_parameter_share"] <= 1


def test_plot_curves_reads_every_evaluation_of_the_finished_runs(tmp_path, monkeypatch):
    folder = tmp_path / "lr5e-4"
    for seed, values in ((0, [0.5, 0.6, 0.7]), (1, [0.55, 0.65, 0.6])):
        run = folder / "glue-rte" / "lora" / f"seed{seed}"
        run.mkdir(parents=True)
        evals = [
            {"step": 10 * (i + 1), "epoch": i + 1.0, "accuracy": v} for i, v in enumerate(values)
        ]
        result = {
            "task": "glue:rte",
            "method": "lora",
            "main_metric": "accuracy",
            "config": {"seed": seed, "learning_rate": 5e-4},
            "evals": [{"step": 0, "epoch": 0.0, "accuracy": 0.4}, *evals],
            "train_losses": [0.7, 0.6, 0.5],
        }
        (run / "results.json").write_text(json.dumps(result))
    (folder / "glue-rte" / "lora" / "seed2").mkdir()  # unfinished: no results.json
    out, table = tmp_path / "curves.png", tmp_path / "curves.json"
    monkeypatch.setattr(
        sys, "argv", ["plot_curves", str(folder), "--out", str(out), "--json", str(table)]
    )
    runpy.run_path(str(BENCHMARKS / "plot_curves.py"), run_name="__main__")
    curves = json.loads(table.read_text())
    assert [c["label"] for c in curves] == ["lora seed 0", "lora seed 1"]  # one folder: rows
    flat = [value for point in curves[1]["points"] for value in point]
    assert flat == pytest.approx([0.0, 40.0, 1.0, 55.0, 2.0, 65.0, 3.0, 60.0])
    assert out.stat().st_size > 0
    argv = ["plot_curves", str(folder), "--mean", "--out", str(out), "--json", str(table)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "plot_curves.py"), run_name="__main__")
    (mean,) = json.loads(table.read_text())
    assert mean["label"] == "lora (mean of seeds 0, 1)" and mean["seeds"] == 2
    flat = [value for point in mean["points"] for value in point]
    assert flat == pytest.approx([0.0, 40.0, 1.0, 52.5, 2.0, 62.5, 3.0, 65.0])
    other = tmp_path / "lr2e-3"  # several folders: each line names its folder
    shutil.copytree(folder / "glue-rte" / "lora" / "seed0", other / "glue-rte" / "lora" / "seed0")
    monkeypatch.setattr(sys, "argv", [*argv[:2], str(other), *argv[2:]])
    runpy.run_path(str(BENCHMARKS / "plot_curves.py"), run_name="__main__")
    labels = [c["label"] for c in json.loads(table.read_text())]
    assert labels == ["lr5e-4 lora (mean of seeds 0, 1)", "lr2e-3 lora (mean of seeds 0)"]


def test_paper_scale_quick(tmp_path, monkeypatch):
    payload = run_quick("paper_scale", tmp_path / "out.json", monkeypatch)
    config = payload["config"]
    fields = config["model_config"]
    assert fields["num_attention_heads"] == 4 * fields["num_key_value_heads"]  # LLaMA's 32:8
    assert config["tokens"] == config["sequences"] * config["seq_len"]
    assert set(payload["timings"]) == {"forward", "senslora"}
    assert payload["ratio"] == payload["timings"]["senslora"]["wall"]["ratio_paired_median"] > 0
    assert payload["phases"]["statistics_median_s"] > 0
    memory = payload["memory"]
    assert memory["weights_bytes"] == 4 * config["parameters"]  # float32 on the CPU
    assert memory["forward_peak_bytes"] is None  # measured on CUDA only
    # the activation statistics: one float32 value per input channel of each of the 2 x 7 matrices
    hidden, intermediate = fields["hidden_size"], fields["intermediate_size"]
    assert memory["statistics_bytes"] >= 4 * 2 * (6 * hidden + intermediate)


def test_paper_scale_model_is_llama31_8b_sized(monkeypatch):
    """The full configuration has LLaMA3.1-8B's parameter count (8,030,261,248), checked on the
    meta device so that nothing is allocated."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch
    from paper_scale import LLAMA31_8B, build_model

    model = build_model(LLAMA31_8B, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.real_model
def test_gpu_kit_holds_what_the_benchmarks_read_and_no_weights(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from gpu_kit import build

    kit = build(tmp_path / "kit")
    files = [f for f in kit.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"}]
    assert sum(f.stat().st_size for f in files) < 16 * 2**20  # it must travel (64 MiB in all)
    # with the kit leading the path, senslora finds every asset inside it
    script = (
        "from senslora.data.assets import minilm_path, wikipedia_sample_path\n"
        "from senslora.models import builtin_model_path\n"
        "print(minilm_path()); print(wikipedia_sample_path()); print(builtin_model_path('smollm2'))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(kit / "site"),
        "SENSLORA_CACHE": str(kit / "cache"),
    }
    found = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(found) == 3 and all(Path(p).resolve().is_relative_to(kit.resolve()) for p in found)


def test_plot_study_gives_the_paired_differences_seed_by_seed(tmp_path, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'out = "grid"\nmethods = ["lora", "senslora", "frozen"]\n'
        'tasks = ["glue:rte", "glue:mrpc"]\nseeds = [0, 1]\n'
    )
    accuracy = {  # (row, task, seed) -> dev accuracy; senslora lacks mrpc seed 1
        ("lora", "glue:rte", 0): 0.50,
        ("lora", "glue:rte", 1): 0.52,
        ("lora", "glue:mrpc", 0): 0.80,
        ("lora", "glue:mrpc", 1): 0.81,
        ("senslora", "glue:rte", 0): 0.53,
        ("senslora", "glue:rte", 1): 0.51,
        ("senslora", "glue:mrpc", 0): 0.79,
        ("frozen", "glue:rte", 0): 0.40,
    }
    for (row, task, seed), value in accuracy.items():
        folder = tmp_path / "grid" / task.replace(":", "-") / row / f"seed{seed}"
        folder.mkdir(parents=True)
        result = {
            "method": row,
            "task": task.split(":")[1],
            "main_metric": "accuracy",
            "config": {"seed": seed, "task": task},
            "last": {"accuracy": value},
            "best": {"accuracy": value},
        }
        (folder / "results.json").write_text(json.dumps(result))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    out, table = tmp_path / "fig.png", tmp_path / "differences.json"
    argv = ["plot_study.py", str(spec), "--out", str(out), "--json", str(table)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "plot_study.py"), run_name="__main__")
    data = json.loads(table.read_text())
    assert out.stat().st_size > 0 and list(data["rows"]) == ["senslora"]  # frozen left out
    senslora = data["rows"]["senslora"]
    assert senslora["glue:rte"] == pytest.approx({"0": 3.0, "1": -1.0})
    assert senslora["glue:mrpc"] == pytest.approx({"0": -1.0})
    assert senslora["average"] == pytest.approx({"0": 1.0})  # seed 1 lacks a task
