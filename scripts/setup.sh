#!/usr/bin/env bash
# Set up a development environment in .venv and build gpufit's compiled ops.
#
#   ./scripts/setup.sh            create/refresh .venv, install requirements-dev.txt, build
#
# Safe to run again: pip skips what is installed, and the extension is rebuilt only when its
# sources or build scripts changed since the last build (a stamp in .venv records them).
# What is built: CPU kernels, plus CUDA kernels for TORCH_CUDA_ARCH_LIST if set, else for the
# visible GPUs' architectures. Other knobs (see README): CUDA_HOME, GPUFIT_FORCE_CPU=1.
# Long steps print their progress; their full output is kept in .venv/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
watch() { .venv/bin/python gpufit/_build.py --log "$@"; }  # progress lines, full log to a file

echo "setup: installing requirements-dev.txt (torch 2.14.1 and test tools; minutes the first time)"
# --no-compile: Python writes the .pyc of what it imports on first use, instead of pip compiling
# all of torch's thousands of modules up front.
watch .venv/pip-install.log -- .venv/bin/python -m pip install --disable-pip-version-check \
  --no-compile -r requirements-dev.txt
# fsatomic (the atomic writer gpufit and lockgen share) came in as lockgen's dependency, by its
# path; made editable here so that an edit of fsatomic/ is seen without reinstalling.
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -e ./fsatomic

stamp=.venv/.gpufit-build-stamp
digest=$( (find csrc -type f -print0 | sort -z | xargs -0 cat; cat setup.py pyproject.toml \
  gpufit/_build.py; env | grep -E '^(CUDA_HOME|TORCH_CUDA_ARCH_LIST|GPUFIT_FORCE_CPU)=' || true
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true) \
  | sha256sum | cut -d' ' -f1)  # the visible GPUs choose the CUDA archs too
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && \
   .venv/bin/python -c "import gpufit._C" 2>/dev/null; then
  echo "setup: gpufit._C is up to date"
else
  # --no-build-isolation: the build must see the torch installed above (an isolated build
  # env would copy or download a multi-GB torch and could build against a different one).
  echo "setup: building gpufit"
  watch .venv/gpufit-build.log -- .venv/bin/python -m pip install -v --disable-pip-version-check \
    --no-deps --no-build-isolation -e .
  echo "$digest" > "$stamp"
fi
# A .venv made before lockgen was its own distribution had the lockgen command from gpufit;
# replacing that gpufit removes the command, so lockgen puts its own back.
if [ ! -x .venv/bin/lockgen ]; then
  .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --force-reinstall \
    -e ./lockgen
fi
.venv/bin/python -c "import gpufit; print(gpufit.info())"
