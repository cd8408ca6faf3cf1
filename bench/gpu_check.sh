#!/usr/bin/env bash
# The GPU check of a lent machine (issue #17), one script: a full-size random-init Wan 2.1 14B LoRA r=128 training
# step at 81x480x832 with gradient checkpointing, bf16 base then float8 base, each with recycling off and on
# (bench/gpu_step.py: s/step, peak memory next to the planner's prediction, MFU), then one 480p generation clip with
# the DiT offloaded by block groups and stored in float8 (bench/gpu_generate.py: peak memory next to the plan).
# About 5 minutes on one H100/H200. Ends with one line of name=value figures: bf16_* and fp8_* from the steps,
# gen_* from the clip.  Usage: bash bench/gpu_check.sh          (on the GPU)
#                              bash bench/gpu_check.sh --tiny   (the same code on the CPU, tiny model: seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEP=(--steps 2 --warmup 1)
prefixed() { local prefix=$1; shift; for pair in "$@"; do printf '%s%s ' "$prefix" "$pair"; done; }
bf16=$("$PY" bench/gpu_step.py "${STEP[@]}" "$@" | tail -n 1)
fp8=$("$PY" bench/gpu_step.py "${STEP[@]}" --fp8 "$@" | tail -n 1)
gen=$("$PY" bench/gpu_generate.py --offload group --fp8 "$@" | tail -n 1)
# shellcheck disable=SC2086  # the name=value pairs are meant to split
echo "$(prefixed bf16_ $bf16)$(prefixed fp8_ $fp8)$gen"
