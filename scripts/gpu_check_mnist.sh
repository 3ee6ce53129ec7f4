#!/usr/bin/env bash
# GPU check of the MNIST workload: the four-way benchmark (tutorial loop, resident eager,
# torch.compile, gpufit) at batch 64 on the GPU; the goal there is gpufit >= 3x resident eager
# per step.
#
#   scripts/gpu_check_mnist.sh OUT_DIR     (called by scripts/gpu_check.sh after the build;
#                                          about 2-4 minutes)
#
# Expects gpufit to be built with CUDA in place (scripts/gpu_check.sh does that).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "=== mnist benchmark (cuda, batch 64)"
timeout 600 "$PY" -m benchmarks.mnist --device cuda --rounds 2 --out "$OUT" 2>&1 \
  | tee "$OUT/mnist-bench.log"
exit "${PIPESTATUS[0]}"
