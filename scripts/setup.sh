#!/usr/bin/env bash
# Set up a development environment in .venv and build gpufit's compiled ops.
#
#   ./scripts/setup.sh            create/refresh .venv, install requirements-dev.txt, build
#
# Safe to run again: pip skips what is installed, and the extension is rebuilt only when its
# sources or build scripts changed since the last build (a stamp in .venv records them).
# Build knobs (see README): CUDA_HOME, TORCH_CUDA_ARCH_LIST, GPUFIT_FORCE_CPU=1.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing requirements-dev.txt"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

stamp=.venv/.gpufit-build-stamp
digest=$( (find csrc -type f -print0 | sort -z | xargs -0 cat; cat setup.py pyproject.toml \
  gpufit/_build.py; env | grep -E '^(CUDA_HOME|TORCH_CUDA_ARCH_LIST|GPUFIT_FORCE_CPU)=' || true) \
  | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && \
   .venv/bin/python -c "import gpufit._C" 2>/dev/null; then
  echo "setup: gpufit._C is up to date"
else
  # --no-build-isolation: the build must see the torch installed above (an isolated build
  # env would copy or download a multi-GB torch and could build against a different one).
  echo "setup: building gpufit (a CUDA build takes a few minutes on 2 cores)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e .
  echo "$digest" > "$stamp"
fi
.venv/bin/python -c "import gpufit; print(gpufit.info())"
