#!/usr/bin/env bash
# Compiles every CUDA kernel for the target archs with ptxas -v and fails if any kernel spills registers to local
# memory (a spill is a silent slowdown that no test sees). Needs nvcc, not a GPU; CI runs it.
#   AVAR_CUDA_ARCHS="8.0;9.0" (default) picks the archs.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
archs="${AVAR_CUDA_ARCHS:-8.0;9.0}"
gencode=()
for a in ${archs//;/ }; do gencode+=(-gencode "arch=compute_${a/./},code=sm_${a/./}"); done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in csrc/attention/cuda/*.cu; do
  log="$out/$(basename "$cu").log"
  "$nvcc" -O3 --expt-relaxed-constexpr --use_fast_math -std=c++17 -Xptxas -v "${gencode[@]}" -c "$cu" \
    -o "$out/$(basename "$cu").o" >"$log" 2>&1 || { cat "$log"; exit 1; }
  spills=$(grep -E "bytes spill (stores|loads)" "$log" | grep -vc " 0 bytes spill stores, 0 bytes spill loads" || true)
  if [ "$spills" != 0 ]; then
    echo "[avar] $cu: $spills kernel(s) spill registers:"
    grep -B2 -E "[1-9][0-9]* bytes spill" "$log" | grep -E "Compiling|spill" | sed 's/^/    /'
    status=1
  else
    echo "[avar] $cu: no spills ($archs)"
  fi
done
exit $status
