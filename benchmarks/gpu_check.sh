#!/usr/bin/env bash
# The one command for a GPU machine: build for the local GPU's arch, run the CUDA tests, run compute-sanitizer
# (memcheck and racecheck) on small forward/backward runs, and benchmark against SDPA, FlexAttention and eager.
# Writes gpu_report.md and gpu_report.json (plus the logs) into OUTDIR; finishes within ~9 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), GPU_CHECK_BUDGET_S (total budget,
# default 530 s).
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-530}
START=$(date +%s)
CHECKS="$OUT/.checks.json"
LOG="$OUT/gpu_check.log"
: >"$LOG"

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }

# Checks are collected as "name<TAB>value" lines and turned into JSON for the report at the end.
CHECK_LINES=()
record() { CHECK_LINES+=("$1"$'\t'"$2"); log "$1: $2"; }

ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
if [[ -z "$ARCH" ]]; then
  record "gpu" "nvidia-smi found no GPU"
  ARCH="9.0"
fi
record "gpu" "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
export AVAR_CUDA_ARCHS="$ARCH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export AVAR_NVCC_THREADS=${AVAR_NVCC_THREADS:-2}

# 1. Build for this GPU's arch only.
log "building for sm ${ARCH} with ${MAX_JOBS} jobs"
T0=$(date +%s)
timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
BUILD_RC=$?
record "build" "rc=$BUILD_RC in $(($(date +%s) - T0)) s (AVAR_CUDA_ARCHS=$ARCH, log build.log)"
if [[ $BUILD_RC -ne 0 ]]; then
  tail -n 40 "$OUT/build.log" | tee -a "$LOG"
fi
IMPORT_CHECK="import avar_ops, avar_ops._C as C; assert C.with_cuda, 'built without CUDA'; print('avar_ops from', avar_ops.__file__)"
if [[ $BUILD_RC -eq 0 ]] && ! "$PY" -c "$IMPORT_CHECK" >>"$LOG" 2>&1; then
  # The tests import avar_ops from this tree: make sure the extension sits next to its sources.
  log "the editable install left no importable avar_ops._C in the tree: building in place"
  timeout 300 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
  BUILD_RC=$?
  record "build (in place)" "rc=$BUILD_RC"
fi
"$PY" -c "$IMPORT_CHECK" >>"$LOG" 2>&1 || record "import" "avar_ops._C does not import with CUDA (see gpu_check.log)"

# 2. CUDA tests (the whole case grid, bf16 and fp16).
T0=$(date +%s)
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT/tests.log" 2>&1
TEST_RC=$?
record "cuda tests" "rc=$TEST_RC in $(($(date +%s) - T0)) s: $(tail -n 1 "$OUT/tests.log") (log tests.log)"

# 3. compute-sanitizer on small forward/backward runs of every kernel.
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
: >"$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  if [[ ! -x "$SAN" ]]; then
    record "sanitizer $tool" "compute-sanitizer not found"
    continue
  fi
  if [[ $(left) -lt 200 ]]; then
    record "sanitizer $tool" "skipped: $(left) s left in the budget"
    continue
  fi
  T0=$(date +%s)
  echo "===== $tool =====" >>"$OUT/sanitizer.log"
  timeout 120 "$SAN" --tool "$tool" --error-exitcode 3 "$PY" benchmarks/gpu_sanitize.py >>"$OUT/sanitizer.log" 2>&1
  RC=$?
  SUMMARY=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -n 1)
  record "sanitizer $tool" "rc=$RC in $(($(date +%s) - T0)) s: ${SUMMARY:-no summary line} (log sanitizer.log)"
done

# 4. Benchmarks with what is left of the budget (the report is rewritten after every measurement).
"$PY" - "$CHECKS" "${CHECK_LINES[@]}" <<'EOF'
import json, sys
path, lines = sys.argv[1], sys.argv[2:]
json.dump(dict(line.split("\t", 1) for line in lines), open(path, "w"), indent=2)
EOF
BENCH_BUDGET=$(($(left) - 25))
if [[ $BENCH_BUDGET -lt 30 ]]; then
  log "only $(left) s left: benchmark skipped"
  "$PY" benchmarks/bench_gpu.py --out "$OUT" --checks "$CHECKS" --dry-run >>"$LOG" 2>&1
else
  log "benchmarking with a budget of ${BENCH_BUDGET} s"
  timeout $((BENCH_BUDGET + 20)) "$PY" benchmarks/bench_gpu.py --out "$OUT" --checks "$CHECKS" \
    --budget-s "$BENCH_BUDGET" 2>&1 | tee -a "$LOG"
fi
rm -f "$CHECKS"
log "done in $(elapsed) s; report: $OUT/gpu_report.md"
if [[ $BUILD_RC -ne 0 || $TEST_RC -ne 0 ]]; then
  exit 1
fi
exit 0
