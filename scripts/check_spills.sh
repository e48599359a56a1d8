#!/usr/bin/env bash
# Fails if any CUDA kernel spills registers to local memory (a silent slowdown that no test sees): compiles every
# kernel for the target archs with ptxas -v through benchmarks/ptxas_report.py. Needs nvcc, not a GPU; CI runs it.
#   AVAR_CUDA_ARCHS="8.0;9.0" (default) picks the archs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
.venv/bin/python benchmarks/ptxas_report.py --out "$out" --fail-on-spill
