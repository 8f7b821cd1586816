#!/usr/bin/env bash
# GPU smoke test of scale/ (under 5 minutes): ViT-g/14 (vitg14-lvd142m) with FSDP2 on one device, bf16 weights
# (fp32 gradient reduction), full activation checkpointing, 20 timed steps after 5 warm-up steps. Prints images/s,
# peak GPU memory against the memory planner's total for the same setting, and achieved TFLOP/s.
#
#   bash scale/smoke_gpu.sh            # batch 16 per GPU
#   bash scale/smoke_gpu.sh 24         # another batch per GPU
#   bash scale/smoke_gpu.sh --tiny     # a tiny model on CPU: checks this script without a GPU
#   bash scale/smoke_gpu.sh --check    # the whole first-GPU check (scale/gpu_check.py, < 10 min): the 60-step
#                                      # ViT-S/16 loop, NCCL scale/ run + DCP resume + export, dist.compile, this
#                                      # ViT-g smoke test, chapters 7/9/10 under nbval; prints one table
#   bash scale/smoke_gpu.sh --check --cpu-dry-run   # the same as far as a CPU allows
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ "${1:-}" = "--tiny" ]; then
    exec "$PY" -m scale.smoke --tiny --steps 3 --warmup 1
fi
if [ "${1:-}" = "--check" ]; then
    shift
    exec "$PY" -m scale.gpu_check "$@"
fi
BATCH=${1:-16}
PLAN=$(mktemp)
trap 'rm -f "$PLAN"' EXIT
PLAN_ARGS=()
if "$PY" -m scale.plan --config vitg14-lvd142m --gpus 1 --gpu h100 --batch-per-gpu "$BATCH" \
        --activation-checkpointing full --json > "$PLAN"; then
    PLAN_ARGS=(--plan "$PLAN")
else
    echo "memory planner (python -m scale.plan) failed or is missing: no memory comparison"
fi
timeout 300 "$PY" -m scale.smoke --config vitg14-lvd142m --batch-per-gpu "$BATCH" --steps 20 --warmup 5 \
    "${PLAN_ARGS[@]}" train.precision=bf16 dist.param_dtype=bf16 dist.reduce_dtype=fp32 \
    dist.activation_checkpointing=full
