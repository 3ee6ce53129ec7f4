#!/usr/bin/env bash
# GPU check of fused_linear_cross_entropy: its CUDA tests, then the benchmark at bf16 (eager,
# torch's chunked linear_cross_entropy, gpufit, and Liger-Kernel when importable).
#
#   scripts/gpu_check_linear_ce.sh OUT_DIR     (called by scripts/gpu_check.sh after the build;
#                                              about 1-3 minutes on an H100/H200)
#
# Expects gpufit to be built with CUDA in place (scripts/gpu_check.sh does that). Logs, JSON and
# PNG go to OUT_DIR; the exit status is non-zero if either step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

echo "=== linear-ce cuda tests"
timeout 600 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_linear_ce.py \
  tests/test_linear_ce_llm.py tests/test_linear_ce_plan.py 2>&1 \
  | tee "$OUT/linear-ce-cuda-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== linear-ce benchmark (bf16)"
timeout 900 "$PY" -m benchmarks.linear_ce --device cuda --dtype bfloat16 --rounds 5 --out "$OUT" 2>&1 \
  | tee "$OUT/linear-ce-bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit $status
