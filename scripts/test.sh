#!/usr/bin/env bash
# The test command: sets up .venv, builds the extension, runs the lint and format checks and the whole test suite.
# Without arguments it then runs the CUDA tests a second time on the emulated device (avar_ops._C_emu, the CUDA
# kernels compiled by the host compiler: csrc/attention/cuda/emulation.h), so that the CUDA code is exercised on
# machines without a GPU. Arguments go to the first pytest run only, and skip the second.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda_home.sh
headers="$(cuda_home)/include/cuda_bf16.h"
if [ -z "${AVAR_BUILD_CUDA_EMULATION:-}" ]; then
  if [ -f "$headers" ]; then
    export AVAR_BUILD_CUDA_EMULATION=1
  else
    export AVAR_BUILD_CUDA_EMULATION=0
    echo "[avar] no CUDA headers at $headers: the emulated-device pass of the CUDA tests is skipped"
  fi
fi
bash scripts/setup_env.sh
bash scripts/lint.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m pytest -q -ra tests "$@"
if [ $# -eq 0 ] && [ "$AVAR_BUILD_CUDA_EMULATION" = 1 ]; then
  echo "[avar] the CUDA tests again, on the emulated device"
  AVAR_EXTENSION=cuda_emulation .venv/bin/python -m pytest -q -ra tests/test_cuda.py tests/test_cuda_emulation.py
fi
