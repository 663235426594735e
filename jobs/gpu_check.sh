#!/usr/bin/env bash
# GPU throughput and MFU of the fused step on ImageNet-size models (random weights, bf16), < 5 minutes.
#
#   bash jobs/gpu_check.sh                       # eager bf16, then torch.compile'd, on one GPU
#   OUT=/tmp/gpu bash jobs/gpu_check.sh --peak-tflops 989
#
# Prints samples/s, FLOPs per sample and MFU (achieved FLOP/s over the GPU's dense bf16 peak; known
# GPUs are in pipeline/perf/flops.py, others need --peak-tflops). Extra arguments go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_check}"
PYTHON="${PYTHON:-python}"
"$PYTHON" jobs/benchmark.py --gpu-check --finetune-memory --device cuda --out "$OUT/eager" "$@"
"$PYTHON" jobs/benchmark.py --gpu-check --device cuda --compile --out "$OUT/compiled" "$@"
