#!/usr/bin/env bash
# Fails if any CUDA kernel uses local memory (a silent slowdown that no test sees): register spills or a stack
# frame reported by ptxas -v, or st.local / ld.local in its PTX (a work array indexed at run time, which ptxas does
# not count as a spill). Compiles every kernel for the target archs through benchmarks/ptxas_report.py. Needs
# nvcc, not a GPU; CI runs it.
#   AVAR_CUDA_ARCHS="8.0;9.0" (default) picks the archs.
#   AVAR_SPILLS_FAIL=0 reports local memory without failing (a compile error still fails).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(--fail-on-spill)
if [ "${AVAR_SPILLS_FAIL:-1}" = 0 ]; then flags=(); fi
.venv/bin/python benchmarks/ptxas_report.py --out "$out" "${flags[@]}"
