#!/usr/bin/env bash
# One GPU session's measurements, each under its own time limit, JSON written as each one ends.
#
#   here, first:       make gpu-kit && bash benchmarks/gpu_session.sh --quick   (tiny models, CPU)
#   on the GPU machine: bash benchmarks/gpu_session.sh                            (.gpu carried)
#
# The models' configurations, tokenizers and the Wikipedia sample come from .gpu/ (make gpu-kit,
# benchmarks/gpu_kit.py); every model is built with random weights on the device, so nothing
# large travels. Results go to $OUT (default /tmp/gpu-session): one JSON per step and one log.
# Steps, most wanted first, with their limits in seconds (about 9 minutes in all):
#   paper_scale            an 8B-shaped Llama: allocation vs forward pass, peak memory
#   allocation_overhead-*  allocation / forward on MiniLM and SmolLM2 (target <= 1.10)
#   training_cost          step time and peak GPU memory of senslora vs uniform LoRA
#   scaling                allocation time vs calibration-set and model size
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD/.gpu/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SENSLORA_CACHE="$PWD/.gpu/cache" PYTHONUNBUFFERED=1
if [ ! -d .gpu/site ]; then echo "no .gpu/ here: run 'make gpu-kit' and carry .gpu" >&2; exit 2; fi

if [ "${1:-}" = "--quick" ]; then
    device=(--quick)
    gpu=(--quick)
else
    device=(--device cuda)
    gpu=(--device cuda --dtype bfloat16 --random-weights)
fi
log="$OUT/session.log"
: > "$log"
failed=0

step() {  # step NAME LIMIT SCRIPT ARGS...: run one benchmark, its output into the log
    local name=$1 limit=$2 script=$3
    shift 3
    echo "== $name: $script $* (limit ${limit}s) at $(date -u +%T)" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$limit" "$PYTHON" "benchmarks/$script" "$@" \
        --out "$OUT/$name.json" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status at $(date -u +%T)" | tee -a "$log"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"; } | tee -a "$log"

step paper_scale 150 paper_scale.py "${device[@]}"
step allocation_overhead-minilm 90 allocation_overhead.py "${gpu[@]}" --repeat-factor 3 --models minilm
step allocation_overhead-smollm2 120 allocation_overhead.py "${gpu[@]}" --repeat-factor 3 --models smollm2
step training_cost 120 training_cost.py "${gpu[@]}"
step scaling 90 scaling.py "${gpu[@]}"
echo "== done: $failed step(s) failed; results in $OUT" | tee -a "$log"
exit "$failed"
