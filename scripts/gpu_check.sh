#!/usr/bin/env bash
# Build gpufit with CUDA on a GPU machine, run the CUDA tests, the op benchmarks (with the per-op
# scripts/gpu_check_*.sh), the MNIST benchmark and the LM-head benchmark (a tiny Llama in bf16:
# stock transformers loss vs gpufit.fuse vs torch's chunked loss vs Cut Cross-Entropy's CUDA
# kernel vs Liger-Kernel vs TRL's own fused head, and TRL's head on gpufit's op).
#
#   scripts/gpu_check.sh [OUT_DIR]      (default out/gpu_check; about 3-5 minutes on one GPU)
#
# Uses the python3 that holds a CUDA torch (PYTHON=... to choose) and builds in place for the
# visible GPU's architecture only, to keep the build short. Logs, JSON and PNG go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME COMMAND...: run, tee its log, remember a failure, keep going
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv | tee "$OUT/gpu.txt"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
step build "$PY" setup.py -q build_ext --inplace || exit 1
step info "$PY" -m gpufit info
step cuda-tests "$PY" -m pytest -m cuda -q -p no:cacheprovider tests
step linear-relu-bench "$PY" -m benchmarks.linear_relu --device cuda --out "$OUT"
# the MNIST workload at batch 64; the goal on a GPU is gpufit >= 3x resident eager per step
step mnist-bench timeout 600 "$PY" -m benchmarks.mnist --device cuda --rounds 2 --out "$OUT"
# Liger-Kernel is GPU-only (triton kernels), so it is installed here rather than in CI; without
# a package index the benchmark runs without it (and without CCE, if that is missing too)
"$PY" -m pip install --quiet --disable-pip-version-check liger-kernel==0.8.5 \
  cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 2>&1 | tail -1 || echo "gpu_check: liger-kernel not installed"
step lm-head-bench timeout 900 "$PY" -m benchmarks.lm_head --device cuda --out "$OUT"
for extra in scripts/gpu_check_*.sh; do  # per-op checks added beside this script
  [ -e "$extra" ] && step "$(basename "$extra" .sh)" bash "$extra" "$OUT"
done
echo "gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOME STEPS FAILED); outputs in $OUT"
exit $status
