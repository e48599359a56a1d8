#!/usr/bin/env bash
# Creates .venv (once), installs the development requirements and builds avar_ops._C into it (editable).
# The CUDA kernels are compiled when AVAR_CUDA_ARCHS is set (CI sets it) or a GPU is visible; otherwise the
# build is CPU-only. AVAR_FORCE_CPU=1 forces CPU-only. Same rule as setup.py. AVAR_BUILD_CUDA_EMULATION=1 (set by
# scripts/test.sh) also builds avar_ops._C_emu, the CUDA kernels for the emulated device the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[avar] creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, transformers, pytest" 2>/dev/null \
   || [ requirements-dev.txt -nt .venv/.avar-requirements ]; then
  echo "[avar] installing requirements (torch is a ~5 GB wheel: a few minutes the first time)"
  .venv/bin/pip install -q -r requirements-dev.txt
  touch .venv/.avar-requirements
fi

# torch would guess CUDA_HOME from the nvcc on PATH, wrongly when that is a wrapper script; setup.py and this
# script take the toolkit nvcc itself reports.
. scripts/cuda_home.sh
CUDA_HOME=$(cuda_home)
export CUDA_HOME
if command -v ccache >/dev/null 2>&1; then export PATH="/usr/lib/ccache:$PATH"; fi
gpu_visible() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; } ||
    .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}
if [ "${AVAR_FORCE_CPU:-0}" = 1 ]; then
  cuda="off (AVAR_FORCE_CPU=1)"
elif [ -n "${AVAR_CUDA_ARCHS:-}" ]; then
  cuda="on, archs $AVAR_CUDA_ARCHS"
elif gpu_visible; then
  cuda="on (a GPU is visible), for its arch"
else
  cuda='off: no GPU visible (AVAR_CUDA_ARCHS="8.0;9.0" compiles them anyway)'
fi
# Rebuild only when the sources or the build settings changed since the last successful build.
stamp=$( { find csrc -type f -print0 | sort -z | xargs -0 sha1sum; sha1sum setup.py pyproject.toml;
           env | grep -E '^(AVAR_|CUDA_HOME=)' | sort; echo "cuda: $cuda"; } | sha1sum | cut -d' ' -f1)
if [ "$(cat .venv/.avar-build 2>/dev/null)" = "$stamp" ] && .venv/bin/python -c "import avar_ops._C" 2>/dev/null; then
  echo "[avar] avar_ops._C is up to date"
else
  echo "[avar] building avar_ops._C (CUDA kernels: $cuda)"
  start=$(date +%s)
  # setup.py removes the extensions it rebuilds first: a failed build leaves nothing that imports.
  .venv/bin/pip install -q --no-build-isolation --no-deps -e .
  echo "$stamp" > .venv/.avar-build
  echo "[avar] build took $(( $(date +%s) - start )) s"
fi
.venv/bin/python -c "import avar_ops, avar_ops._C as c; print('[avar] avar_ops', avar_ops.__version__, '| cuda kernels:', c.with_cuda, '| cpu isa:', c.cpu_capability)"
if [ "${AVAR_BUILD_CUDA_EMULATION:-0}" = 1 ]; then
  .venv/bin/python -c "import avar_ops._C_emu" && echo "[avar] avar_ops._C_emu (CUDA kernels on the emulated device) is built"
fi
