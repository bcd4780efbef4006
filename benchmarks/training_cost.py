"""Benchmark 3: the cost of a training step with senslora ranks vs uniform LoRA and AdaLoRA.

    .venv/bin/python benchmarks/training_cost.py [--quick] [--device cuda --dtype bfloat16]

A training step is forward + backward + AdamW step (+ AdaLoRA's ``update_and_allocate``) on one
fixed batch of real Wikipedia tokens (packed, no padding). Methods, all on the same modules (every
linear layer of the encoder/decoder) with average rank 4:

- ``lora``: uniform rank 4;
- ``senslora``: senslora ranks under the paper's rank budget (same total rank as ``lora``; large
  matrices get more rank, so more parameters);
- ``senslora_params``: senslora ranks under ``budget="parameters"`` (at most ``lora``'s parameter
  count);
- ``adalora``: peft's AdaLoRA, initial rank 6 pruned to 4 on average, ``update_and_allocate``
  after every optimizer step.

Time: every method's model lives in this process; steps are interleaved method by method (the
order rotates every step) and the median step time after warm-up is reported. Memory, on the CPU:
each method runs in a fresh subprocess; the peak resident memory during the training steps (Linux
VmHWM, reset just before training with /proc/self/clear_refs) minus the resident memory before
them. On CUDA: each method in turn in this process, on a fresh copy of the model, the peak of
``torch.cuda.max_memory_allocated`` (reset before the steps) minus the allocated memory before. The
analytic parameter + gradient + AdamW state memory (trainable parameters x 4 bytes x 4) is given
too.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from subprocess import PIPE

import peft
import torch
from common import (
    QUICK_MODELS,
    Samples,
    autocast,
    calibration,
    environment,
    load_benchmark_model,
    parse_args,
    summarize,
    synchronize,
    timed,
    write_results,
)

import senslora
from senslora.data import load_texts, sample_texts
from senslora.serialization import save_allocation
from senslora.targets import find_target_modules

METHODS = ("lora", "senslora", "senslora_params", "adalora")
AVG_RANK, ALPHA = 4, 8
TARGET = 1.02
# model -> batch size, sequence length, warm-up steps, timed steps, steps in the memory process
FULL = {
    "minilm": {"batch": 32, "length": 128, "warmup": 1, "steps": 5, "memory_steps": 1},
    "smollm2": {"batch": 4, "length": 256, "warmup": 1, "steps": 3, "memory_steps": 1},
}
QUICK = {"batch": 4, "length": 32, "warmup": 1, "steps": 3, "memory_steps": 2}


def task_type(model) -> str:
    return "CAUSAL_LM" if "CausalLM" in type(model).__name__ else "SEQ_CLS"


def training_batch(tokenizer, task: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    """``batch`` x ``length`` real tokens: Wikipedia paragraphs concatenated and cut (seeded)."""
    texts = sample_texts(load_texts("wikipedia"), 2000, seed=0)
    needed, ids = batch * length, []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    input_ids = torch.tensor(ids[:needed]).reshape(batch, length)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if task == "CAUSAL_LM":
        out["labels"] = input_ids.clone()
    else:
        out["labels"] = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(0))
    return out


def allocations(model, tokenizer, names, args) -> dict[str, senslora.Allocation]:
    """senslora ranks under the rank budget and under the parameter budget (not timed here)."""
    batches = calibration(tokenizer, 8 if args.quick else 32, 32 if args.quick else 128)
    stats = senslora.collect_statistics(
        model, batches, targets=names, autocast_dtype=args.autocast_dtype
    )
    return {
        "senslora": senslora.allocate_ranks(
            stats, senslora.AllocationConfig(avg_rank=AVG_RANK, budget="rank")
        ),
        "senslora_params": senslora.allocate_ranks(
            stats, senslora.AllocationConfig(avg_rank=AVG_RANK, budget="parameters")
        ),
    }


def build(method, model, names, task, allocs, total_steps):
    """The peft model of ``method`` around ``model`` (which it modifies)."""
    lora = peft.LoraConfig(
        r=AVG_RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names, task_type=task
    )
    if method == "lora":
        return peft.get_peft_model(model, lora)
    if method in ("senslora", "senslora_params"):
        return senslora.apply_allocation(model, allocs[method], base=lora)
    if method == "adalora":
        config = peft.AdaLoraConfig(
            init_r=(3 * AVG_RANK) // 2,
            target_r=AVG_RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=names,
            task_type=task,
            total_step=total_steps,
            tinit=1,
            tfinal=1,
            deltaT=1,
        )
        return peft.get_peft_model(model, config)
    raise ValueError(f"unknown method {method!r}")


class Trainer:
    """One method: its peft model, AdamW, and one training step on the fixed batch."""

    def __init__(self, method, model, batch, args):
        self.method, self.model, self.batch, self.args = method, model, batch, args
        self.model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.step_count = 0

    def step(self) -> None:
        with autocast(self.args.device, self.args.autocast_dtype):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        if self.method == "adalora":  # scores with the gradients: before they are zeroed
            self.model.base_model.update_and_allocate(self.step_count)
        self.optimizer.zero_grad(set_to_none=True)


def lora_parameters(model) -> int:
    """Trainable parameters inside the adapters (without the trained classifier head)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def time_steps(trainers: dict[str, Trainer], sizes, device) -> Samples:
    """Seconds per training step, methods interleaved step by step (rotating order)."""
    names = list(trainers)
    samples = Samples(names)
    for step in range(sizes["warmup"] + sizes["steps"]):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed(trainers[name].step, device)
            if step >= sizes["warmup"]:
                samples.add(name, wall, cpu)
        if step >= sizes["warmup"]:
            print(f"  step {step}: " + ", ".join(f"{n} {samples[n][-1]:.3f}s" for n in names))
    return samples


# ---------------------------------------------------------------------------------------------
# Memory, in fresh processes


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_memory(trainer: Trainer, steps: int, device: torch.device) -> dict:
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            trainer.step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        how = "torch.cuda.max_memory_allocated - memory_allocated before the steps"
    else:
        import resource

        reset = _reset_peak_rss()
        before = _status_kib("VmRSS") * 1024
        for _ in range(steps):
            trainer.step()
        if reset:
            peak = _status_kib("VmHWM") * 1024
            how = "peak RSS (VmHWM, reset before the steps) - RSS before the steps"
        else:  # the lifetime peak: may include model loading
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            how = "ru_maxrss - RSS before the steps (peak not resettable)"
    return {
        "peak_growth_bytes": peak - before,
        "before_bytes": before,
        "peak_bytes": peak,
        "measured_as": how,
    }


def memory_worker(args) -> None:
    """In a fresh process: measure the jobs of the spec file, print the results as JSON."""
    jobs = json.loads(Path(args.memory_worker).read_text())
    print("MEMORY " + json.dumps(measure_jobs(jobs, args)))


def measure_jobs(jobs: list[dict], args) -> dict[str, dict]:
    """For every job, build each method in turn, train a few steps and measure the memory."""
    out: dict[str, dict] = {}
    for job in jobs:
        model, tokenizer = load_benchmark_model(job["model"], args.device)
        for tensor in [*model.parameters(), *model.buffers()]:  # off the memory-mapped file
            tensor.data = tensor.data.clone()
        task = task_type(model)
        names = list(find_target_modules(model))
        allocs = {k: senslora.load_allocation(v) for k, v in job["allocations"].items()}
        batch = training_batch(tokenizer, task, job["batch"], job["length"])
        batch = {k: v.to(args.device) for k, v in batch.items()}
        several = len(jobs) > 1 or len(job["methods"]) > 1
        for method in job["methods"]:
            base = copy.deepcopy(model) if several else model
            peft_model = build(method, base, names, task, allocs, total_steps=job["steps"] + 2)
            trainer = Trainer(method, peft_model, batch, args)
            result = measure_memory(trainer, job["steps"], args.device)
            out.setdefault(job["model"], {})[method] = result
            del trainer, peft_model, base
    return out


def measure_memory_of(jobs: list[dict], args, folder: Path) -> dict[str, dict]:
    """Every (model, method) in a fresh process of its own on the CPU; on CUDA, and with --quick,
    all in this process, one fresh model after the other.

    On the CPU the peak resident memory of a process is the only measure, and a process that
    already trained keeps what its allocator grew (so --quick is a smoke run: the first method
    measured also pays the allocator's first growth). On CUDA ``max_memory_allocated`` counts
    the bytes of live tensors, reset before each method's steps, whatever was allocated and freed
    before; the one-off allocations (cuBLAS workspaces, kernels) were made by the timed steps.
    That spares a GPU session eight process start-ups."""
    if args.quick or args.device.type == "cuda":
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        return measure_jobs(jobs, args)
    groups = [[{**job, "methods": [m]}] for job in jobs for m in job["methods"]]
    running: list[tuple[subprocess.Popen, Path]] = []
    results: dict[str, dict] = {}
    # memory does not depend on CPU contention: two workers at a time
    parallel = max(1, min(2, os.cpu_count() or 1)) if args.device.type == "cpu" else 1
    for number, group in enumerate(groups):
        spec = folder / f"memory-jobs-{number}.json"
        spec.write_text(json.dumps(group))
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", str(spec)]
        command += ["--device", str(args.device), "--dtype", args.dtype]
        command += ["--threads", str(args.threads)]
        # large blocks always mmap-ed: freed memory goes back at once, RSS follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        process = subprocess.Popen(command, stdout=PIPE, stderr=PIPE, text=True, env=env)
        running.append((process, spec))
        if len(running) >= parallel or number == len(groups) - 1:
            for process, _ in running:
                _collect(process, results)
            running = []
    return results


def _collect(process: subprocess.Popen, results: dict[str, dict]) -> None:
    stdout, stderr = process.communicate()
    lines = [x for x in stdout.splitlines() if x.startswith("MEMORY ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker failed:\n{stderr[-3000:]}")
    for model, by_method in json.loads(lines[-1][len("MEMORY ") :]).items():
        results.setdefault(model, {}).update(by_method)
        for method, m in by_method.items():
            print(f"  memory {model} {method}: {m['peak_growth_bytes'] / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------------------------


def time_model(name: str, args, folder: Path) -> tuple[dict, dict]:
    """Step times of every method on one model; the memory job of that model."""
    model_name = QUICK_MODELS[name] if args.quick else name
    sizes = dict(QUICK if args.quick else FULL[name])
    sizes["steps"] *= args.repeat_factor
    model, tokenizer = load_benchmark_model(model_name, args.device)
    task = task_type(model)
    names = list(find_target_modules(model))
    allocs = allocations(model, tokenizer, names, args)
    batch = training_batch(tokenizer, task, sizes["batch"], sizes["length"])
    batch = {k: v.to(args.device) for k, v in batch.items()}
    total_steps = sizes["warmup"] + sizes["steps"] + 1
    trainers = {
        m: Trainer(m, build(m, copy.deepcopy(model), names, task, allocs, total_steps), batch, args)
        for m in METHODS
    }
    print(f"{model_name}: {task}, batch {sizes['batch']} x {sizes['length']}, {len(names)} targets")
    timings = summarize(time_steps(trainers, sizes, args.device), baseline="lora")
    methods = {
        m: {
            "step_timings": timings[m],
            "median_step_s": timings[m]["wall"]["median_s"],
            "time_ratio_vs_lora": timings[m]["wall"]["ratio_paired_median"],
            "trainable_parameters": trainer.trainable,
            "adapter_parameters": lora_parameters(trainer.model),
            "analytic_training_state_bytes": trainer.trainable * 4 * 4,
        }
        for m, trainer in trainers.items()
    }
    base_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    lora_flops = 4 * base_weights + 6 * methods["lora"]["adapter_parameters"]
    for entry in methods.values():
        # per token: frozen weights 2 (forward) + 2 (input gradient), adapters 2 + 4
        entry["analytic_matmul_flops_ratio_vs_lora"] = (
            4 * base_weights + 6 * entry["adapter_parameters"]
        ) / lora_flops
    methods["lora"]["total_rank"] = AVG_RANK * len(names)
    for m in ("senslora", "senslora_params"):
        methods[m]["total_rank"] = allocs[m].total_rank
        methods[m]["rank_budget"] = allocs[m].config.budget
    result = {
        "model": model_name,
        "task_type": task,
        "targets": len(names),
        "batch": {"size": sizes["batch"], "length": sizes["length"], "tokens": "real, packed"},
        "sizes": sizes,
        "target": TARGET,
        "methods": methods,
    }
    job = {
        "model": model_name,
        "methods": list(METHODS),
        "allocations": {
            k: str(save_allocation(a, folder / f"{model_name}-{k}.json")) for k, a in allocs.items()
        },
        "batch": sizes["batch"],
        "length": sizes["length"],
        "steps": sizes["memory_steps"],
    }
    return result, job


def add_memory(result: dict, memory: dict[str, dict]) -> None:
    methods = result["methods"]
    lora_growth = memory["lora"]["peak_growth_bytes"]
    for m, entry in methods.items():
        entry["memory"] = memory[m]
        growth = memory[m]["peak_growth_bytes"]
        entry["memory_ratio_vs_lora"] = growth / lora_growth if lora_growth > 0 else None
    for m in ("senslora", "senslora_params"):
        entry = methods[m]
        memory_ratio = entry["memory_ratio_vs_lora"]
        entry["met"] = entry["time_ratio_vs_lora"] <= TARGET and (
            memory_ratio is not None and memory_ratio <= TARGET
        )
    print(f"{result['model']}:")
    for m, e in methods.items():
        print(
            f"  {m}: {e['median_step_s']:.3f} s/step (x{e['time_ratio_vs_lora']:.3f}), "
            f"peak growth {e['memory']['peak_growth_bytes'] / 2**20:.1f} MiB "
            f"(x{e['memory_ratio_vs_lora'] or float('nan'):.3f}), "
            f"{e['trainable_parameters']:,} trainable"
        )


def main() -> None:
    parser_extra = lambda p: p.add_argument("--memory-worker", help="internal: a job file")  # noqa: E731
    args = parse_args("training_cost", __doc__.splitlines()[0], parser_extra)
    torch.manual_seed(0)
    if args.memory_worker:
        memory_worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        timed_models = [time_model(name, args, Path(tmp)) for name in args.models]
        memory = measure_memory_of([job for _, job in timed_models], args, Path(tmp))
    results = []
    for result, _ in timed_models:
        add_memory(result, memory[result["model"]])
        results.append(result)
    payload = {
        "benchmark": "training_cost",
        "environment": environment(args.device),
        "config": {
            "quick": args.quick,
            "repeat_factor": args.repeat_factor,
            "dtype": args.dtype,
            "avg_rank": AVG_RANK,
            "lora_alpha": ALPHA,
            "optimizer": "AdamW lr 1e-4",
            "sizes": QUICK if args.quick else FULL,
            "memory_processes": "this one (quick)"
            if args.quick
            else "this one, one method after the other"
            if args.device.type == "cuda"
            else "one per model and method",
        },
        "models": results,
    }
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
