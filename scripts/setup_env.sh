#!/usr/bin/env bash
# Creates .venv (once), installs the development requirements and builds avar_ops._C into it (editable).
# Environment: AVAR_FORCE_CPU=1 skips the CUDA sources; AVAR_CUDA_ARCHS picks the archs (default 8.0;9.0).
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

# torch guesses CUDA_HOME=/usr/local from the nvcc on PATH, which does not link.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if command -v ccache >/dev/null 2>&1; then export PATH="/usr/lib/ccache:$PATH"; fi
# Rebuild only when the sources or the build settings changed since the last successful build.
stamp=$( { find csrc -type f -print0 | sort -z | xargs -0 sha1sum; sha1sum setup.py pyproject.toml;
           env | grep -E '^(AVAR_|CUDA_HOME=)' | sort; } | sha1sum | cut -d' ' -f1)
if [ "$(cat .venv/.avar-build 2>/dev/null)" = "$stamp" ] && .venv/bin/python -c "import avar_ops._C" 2>/dev/null; then
  echo "[avar] avar_ops._C is up to date"
else
  echo "[avar] building avar_ops._C (CUDA: $([ "${AVAR_FORCE_CPU:-0}" = 1 ] && echo off || echo "if nvcc is found, archs ${AVAR_CUDA_ARCHS:-8.0;9.0}"))"
  start=$(date +%s)
  .venv/bin/pip install -q --no-build-isolation --no-deps -e .
  echo "$stamp" > .venv/.avar-build
  echo "[avar] build took $(( $(date +%s) - start )) s"
fi
.venv/bin/python -c "import avar_ops, avar_ops._C as c; print('[avar] avar_ops', avar_ops.__version__, '| cuda kernels:', c.with_cuda, '| cpu isa:', c.cpu_capability)"
