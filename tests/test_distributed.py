"""Distributed calibration: two gloo processes on this CPU give the single-process statistics.

One `torch.multiprocessing.spawn` runs every distributed case (the start-up dominates): the two
processes join the group from torchrun's environment variables (`launched_process_group`),
collect statistics, hit the error paths, and run `senslora allocate` as it runs under torchrun.
Each saves what it got; the tests compare that with single-process runs on the same batches.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import save_tiny_bert_with_minilm_tokenizer, tiny_bert, tiny_llama, token_batches
from torch import nn
from typer.testing import CliRunner

import senslora
from senslora.cli import app
from senslora.distributed import distributed_world, launched_process_group, shard_batches

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bert_batches():
    return token_batches(num_batches=4, batch=3, length=7, seed=1, labels=True)


def llama_batches():
    return token_batches(num_batches=3, batch=2, length=6, seed=2)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def cases():
    """name -> (model, batches, keyword arguments of collect_statistics)."""
    return {
        "activation": (tiny_bert(), bert_batches(), {"keep_gram": True}),
        "fisher": (tiny_bert(), bert_batches(), {"estimator": "fisher"}),
        "fisher_per_batch": (
            tiny_bert(),
            bert_batches(),
            {"estimator": "fisher", "per_sample": False},
        ),
        "uneven": (tiny_bert(), bert_batches()[:3], {}),  # ranks get 2 and 1 batches
        "one_batch": (tiny_bert(), bert_batches()[:1], {}),  # rank 1 gets none
        "llama_fisher": (tiny_llama(), llama_batches(), {"estimator": "fisher"}),
        "llama_uneven_fisher": (tiny_llama(), llama_batches()[:1], {"estimator": "fisher"}),
    }


def plain(stats):
    return {
        name: {
            "column_values": s.column_values,
            "diagonal": s.diagonal,
            "gram": s.gram,
            "num_tokens": s.num_tokens,
        }
        for name, s in stats.items()
    }


def cli_args(model_dir: Path, calib: Path, out: Path) -> list[str]:
    args = ["allocate", "--model", model_dir, "--calib", calib, "--out", out, "--device", "cpu"]
    args += ["--num-samples", 9, "--seq-len", 16, "--batch-size", 2, "--avg-rank", 3]
    return [str(a) for a in args]


def _worker(rank: int, port: int, out: str, model_dir: str, calib: str) -> None:
    """One process of the group, set up as torchrun does (environment variables)."""
    torch.set_num_threads(1)  # two processes on a shared CPU
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    results, errors = {}, {}
    with launched_process_group("cpu") as group_rank:
        assert group_rank == rank and distributed_world() == (rank, WORLD_SIZE)
        _run_cases(rank, results, errors)
        # the command line inside the group, as under torchrun: rank 0 alone prints and writes
        cli = CliRunner().invoke(app, cli_args(Path(model_dir), Path(calib), Path(out) / "cli"))
        results["cli"] = {"exit_code": cli.exit_code, "output": cli.output}
    assert not dist.is_initialized()  # the group was left again
    torch.save({"results": results, "errors": errors}, Path(out) / f"rank{rank}.pt")


def _run_cases(rank: int, results: dict, errors: dict) -> None:
    for name, (model, batches, kwargs) in cases().items():
        stats = senslora.collect_statistics(model, batches, **kwargs)
        results[name] = plain(stats)
        config = senslora.AllocationConfig(avg_rank=3)
        results[name]["ranks"] = senslora.allocate_ranks(stats, config).ranks
    results["hutchinson"] = plain(
        senslora.collect_statistics(
            tiny_llama(), llama_batches(), estimator="hutchinson", num_probes=2
        )
    )
    results["not_distributed"] = plain(
        senslora.collect_statistics(tiny_bert(), bert_batches()[:1], distributed=False)
    )
    # errors must reach every rank at the same point, after the reduce (no hang)
    checks = {
        "empty": lambda: senslora.collect_statistics(tiny_bert(), []),
        "nan_on_rank_1": lambda: senslora.collect_statistics(
            mlp(), [(torch.ones(2, 3),), (torch.full((2, 3), float("nan")),)]
        ),
        "different_modules": lambda: senslora.collect_statistics(
            tiny_bert(), bert_batches(), targets=["query"] if rank == 0 else ["key"]
        ),
    }
    for name, check in checks.items():
        try:
            check()
            errors[name] = "no error"
        except (ValueError, FloatingPointError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    results["after_errors"] = plain(senslora.collect_statistics(tiny_bert(), bert_batches()))


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-inputs")
    model_dir = save_tiny_bert_with_minilm_tokenizer(folder / "model")
    calib = folder / "calib.txt"
    calib.write_text(
        "\n".join(f"line {i} about ranks and adapters " * (i % 3 + 1) for i in range(9))
    )
    return model_dir, calib


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, cli_inputs):
    """What each of the two processes returned, keyed by rank."""
    out = tmp_path_factory.mktemp("distributed")
    args = (free_port(), str(out), *map(str, cli_inputs))
    mp.spawn(_worker, args=args, nprocs=WORLD_SIZE, join=True)
    found = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"ranks": found, "out": out}


def assert_same_stats(got, expected, rtol=1e-5, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name]["num_tokens"] == expected[name]["num_tokens"], name
        for key in ("column_values", "diagonal", "gram"):
            if expected[name][key] is None:
                assert got[name][key] is None
            else:
                torch.testing.assert_close(
                    got[name][key], expected[name][key], rtol=rtol, atol=atol
                )


@pytest.mark.parametrize("case", list(cases()))
def test_every_rank_gets_the_single_process_statistics_and_ranks(ranks, case):
    model, batches, kwargs = cases()[case]
    single = senslora.collect_statistics(model, batches, **kwargs)
    expected = plain(single)
    expected_ranks = senslora.allocate_ranks(single, senslora.AllocationConfig(avg_rank=3)).ranks
    for rank in range(WORLD_SIZE):
        got = ranks["ranks"][rank]["results"][case]
        assert got.pop("ranks") == expected_ranks
        assert_same_stats(got, expected)


def test_hutchinson_is_identical_across_ranks_with_per_rank_probes(ranks):
    first, second = (r["results"]["hutchinson"] for r in ranks["ranks"])
    assert_same_stats(first, second, rtol=0, atol=0)
    single = plain(
        senslora.collect_statistics(
            tiny_llama(), llama_batches(), estimator="hutchinson", num_probes=2
        )
    )
    name = next(iter(single))
    assert first[name]["num_tokens"] == single[name]["num_tokens"] == 3 * 2
    assert not torch.equal(first[name]["diagonal"], single[name]["diagonal"])  # other probes


def test_distributed_false_keeps_the_local_statistics(ranks):
    local = plain(senslora.collect_statistics(tiny_bert(), bert_batches()[:1]))
    for rank in range(WORLD_SIZE):
        assert_same_stats(ranks["ranks"][rank]["results"]["not_distributed"], local, rtol=0, atol=0)


def test_errors_are_raised_on_every_rank_after_the_reduce(ranks):
    for rank in range(WORLD_SIZE):
        errors = ranks["ranks"][rank]["errors"]
        assert errors["empty"].startswith("ValueError: calibration set is empty")
        assert errors["nan_on_rank_1"].startswith("FloatingPointError: non-finite")
        assert "float32" in errors["nan_on_rank_1"]
        assert errors["different_modules"].startswith("ValueError: the processes collected")
        assert "after_errors" in ranks["ranks"][rank]["results"]  # the group still works after


def test_shard_batches_round_robin():
    assert shard_batches(list(range(7)), 0, 3) == [0, 3, 6]
    assert shard_batches(list(range(7)), 2, 3) == [2, 5]
    assert shard_batches([0], 1, 2) == []
    assert list(shard_batches(iter(range(5)), 1, 2)) == [1, 3]
    shards = [shard_batches(list(range(10)), r, 4) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(10))
    for rank, world_size in ((2, 2), (-1, 2), (0, 0), (True, 2)):
        with pytest.raises(ValueError, match="rank"):
            shard_batches([1, 2], rank, world_size)


def test_distributed_true_without_a_process_group_is_a_clear_error():
    assert distributed_world(None) is None and distributed_world(False) is None
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        senslora.collect_statistics(tiny_bert(), bert_batches(), distributed=True)


def test_launched_process_group_without_torchrun_is_rank_zero(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with launched_process_group() as rank:
        assert rank == 0 and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        with launched_process_group():
            pass


def test_cli_in_a_process_group_writes_once_the_single_process_allocation(ranks, cli_inputs):
    """`senslora allocate` as under torchrun: rank 0 alone prints the table and writes."""
    single_out = ranks["out"] / "single"
    single = CliRunner().invoke(app, cli_args(*cli_inputs, single_out))
    assert single.exit_code == 0, single.output
    outputs = [r["results"]["cli"] for r in ranks["ranks"]]
    assert [o["exit_code"] for o in outputs] == [0, 0], outputs
    assert "LoRA ranks" in outputs[0]["output"] and outputs[1]["output"].strip() == ""
    multi_out = ranks["out"] / "cli"
    assert sorted(p.name for p in multi_out.iterdir()) == [
        "adapter_config.json",
        "allocation.json",
        "ranks.png",
    ]
    multi = json.loads((multi_out / "allocation.json").read_text())
    reference = json.loads((single_out / "allocation.json").read_text())
    assert multi["ranks"] == reference["ranks"]
    assert multi["provenance"]["world_size"] == WORLD_SIZE
    assert reference["provenance"]["world_size"] == 1
    assert multi["provenance"]["num_tokens"] == reference["provenance"]["num_tokens"]


def offloaded_llamas(folder):
    """The same tiny Llama three ways: all on disk via device_map="auto" and a tiny max_memory,
    half on CPU and half on disk via an explicit device_map, and accelerate's cpu_offload."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(folder / "llama")
    mixed = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "lm_head": "disk",
    }
    yield AutoModelForCausalLM.from_pretrained(
        folder / "llama",
        device_map="auto",
        max_memory={"cpu": 6_000},
        offload_folder=folder / "offload-auto",
    )
    yield AutoModelForCausalLM.from_pretrained(
        folder / "llama", device_map=mixed, offload_folder=folder / "offload-mixed"
    )
    yield cpu_offload(tiny_llama(), execution_device="cpu")


def test_offloaded_model_gives_the_plain_statistics(tmp_path):
    batches = llama_batches()
    reference = senslora.collect_statistics(tiny_llama(), batches, keep_gram=True)
    for model in offloaded_llamas(tmp_path):
        assert any(p.device.type == "meta" for p in model.parameters())
        stats = senslora.collect_statistics(model, batches, keep_gram=True)
        assert_same_stats(plain(stats), plain(reference))


def test_cli_device_map_gives_the_plain_allocation(tmp_path):
    model_dir = save_tiny_bert_with_minilm_tokenizer(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"line {i} about ranks and adapters" for i in range(8)))
    args = ["allocate", "--model", str(model_dir), "--calib", str(calib), "--seq-len", "16"]
    documents = []
    for name, extra in (("plain", []), ("mapped", ["--device-map", "auto"])):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        documents.append(json.loads((tmp_path / name / "allocation.json").read_text()))
    assert documents[0]["ranks"] == documents[1]["ranks"]
    assert documents[0]["modules"] == documents[1]["modules"]
