#!/usr/bin/env bash
# The one command for a GPU machine, within one time budget (default 540 s = 9 minutes, build included):
#   1. build   avar_ops._C for the local GPU's arch only (nvidia-smi's compute capability)
#   2. smoke   one forward and backward on the GPU against the float64 reference
#   3. tests   tests/test_cuda.py (the whole case grid, bf16 and fp16)
#   4. bench   benchmarks/bench_gpu.py: forward / backward against SDPA flash and FlexAttention at 1k, 4k and 16k
#              tokens, decode against SDPA
#   5. memcheck, 6. racecheck   compute-sanitizer on benchmarks/gpu_sanitize.py, with whatever time is left
# Each stage has its own budget (they add up to the total); a stage that runs out is stopped and reported as
# timed out, and the next one starts. Nothing is installed: the machine's python must already have torch,
# transformers and pytest (their versions go into the report), and nvcc.
#
#   benchmarks/gpu_check.sh [--dry-run] [LOGDIR]
#
# Full logs of every stage stay in LOGDIR (default build/gpu_check). The report goes to
# benchmarks/results/gpu_report_<arch>.{json,md} (GPU_CHECK_REPORT_DIR overrides the folder), ready to commit.
# --dry-run, or no GPU: every stage reports "skipped: no GPU" and the script exits 0.
#
# Environment: PYTHON (default python3), CUDA_HOME (default: the toolkit of the nvcc on PATH), GPU_CHECK_BUDGET_S
# (total, default 540; stage budgets scale with it).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
if [[ $# -gt 1 ]]; then
  echo "usage: $0 [--dry-run] [LOGDIR]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${1:-$ROOT/build/gpu_check}
mkdir -p "$LOGDIR" || { echo "gpu_check: cannot create the log folder $LOGDIR" >&2; exit 2; }
LOGDIR=$(cd "$LOGDIR" && pwd)
REPORT_DIR=${GPU_CHECK_REPORT_DIR:-$ROOT/benchmarks/results}
mkdir -p "$REPORT_DIR" || { echo "gpu_check: cannot create the report folder $REPORT_DIR" >&2; exit 2; }
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-540}
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [[ $BUDGET -lt 60 ]]; then
  echo "gpu_check: GPU_CHECK_BUDGET_S must be a whole number of seconds >= 60, got '$BUDGET'" >&2
  exit 2
fi
START=$(date +%s)
LOG="$LOGDIR/gpu_check.log"
STAGES="$LOGDIR/stages.tsv"
: >"$LOG"
: >"$STAGES"

# Stage budgets in per mille of the total; they add up to 1000 (the sanitizers also get what earlier stages left).
declare -A SHARE=([build]=390 [smoke]=60 [tests]=200 [bench]=230 [memcheck]=60 [racecheck]=60)
STAGE_ORDER=(build smoke tests bench memcheck racecheck)

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }
stage_budget() { echo $((BUDGET * SHARE[$1] / 1000)); }
# One line per stage: name, status, seconds, budget, detail (the report reads them).
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STAGES"; log "$1: $2 ($3 s of $4 s) $5"; }

# Runs stage $1 as the command "${@:2}" under a timeout, its full output in LOGDIR/$1.log.
run_stage() {
  local name=$1
  shift
  local budget
  budget=$(stage_budget "$name")
  if [[ $name == memcheck || $name == racecheck ]]; then
    # The sanitizers share what is left: memcheck takes half of it, racecheck the rest.
    budget=$(left)
    [[ $name == memcheck ]] && budget=$((budget / 2))
  fi
  if [[ $budget -lt 5 ]]; then
    record "$name" "skipped" 0 "$budget" "no time left in the budget"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" >"$LOGDIR/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) status
  if [[ $rc -eq 0 ]]; then
    status="ok"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    status="timed out"
  else
    status="failed (rc=$rc)"
  fi
  record "$name" "$status" "$took" "$budget" "$(tail -n 1 "$LOGDIR/$name.log" | tr '\t' ' ' | cut -c1-200) (log $name.log)"
  [[ $rc -eq 0 ]]
}

# Nothing is installed here: the lent GPU machines reach no package registry.
VERSIONS=$("$PY" - <<'EOF' 2>&1
import importlib, sys
missing, found = [], []
for name in ("torch", "transformers", "pytest"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__})")
print(", ".join(found))
if missing:
    print("missing: " + ", ".join(missing))
    sys.exit(1)
EOF
)
if [[ $? -ne 0 ]]; then
  echo "gpu_check: $PY lacks $(echo "$VERSIONS" | grep '^missing' | cut -d' ' -f2-); this script installs nothing: use a python that has torch, transformers and pytest (PYTHON=...)" >&2
  exit 2
fi
log "python: $("$PY" --version 2>&1) at $(command -v "$PY"); $VERSIONS"

ARCH=""
GPU=""
if [[ $DRY -eq 0 ]]; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
  GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
fi
if [[ -z "$ARCH" ]]; then
  DRY=1
  ARCH_TAG=${GPU_CHECK_ARCH_TAG:-none}
  log "no GPU (or --dry-run): every stage is skipped"
else
  ARCH_TAG="sm_${ARCH/./}"
  log "GPU: $GPU, compute capability $ARCH"
fi

if [[ $DRY -eq 1 ]]; then
  for name in "${STAGE_ORDER[@]}"; do record "$name" "skipped: no GPU" 0 "$(stage_budget "$name")" ""; done
else
  export AVAR_CUDA_ARCHS="$ARCH"
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export AVAR_NVCC_THREADS=${AVAR_NVCC_THREADS:-2}
  BUILD_OK=0
  # setup.py removes the old extension first, so a failed build leaves nothing importable behind.
  run_stage build "$PY" setup.py build_ext --inplace && BUILD_OK=1
  if [[ $BUILD_OK -eq 1 ]] && ! "$PY" -c "import avar_ops._C as C; assert C.with_cuda" >>"$LOG" 2>&1; then
    log "the build left no avar_ops._C with CUDA kernels"
    BUILD_OK=0
  fi
  if [[ $BUILD_OK -eq 1 ]]; then
    run_stage smoke "$PY" benchmarks/gpu_smoke.py
    run_stage tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
    # The tile shapes: once bench_gpu.py has --tiles (timing both tile shapes of the kernels in one run), add it
    # to this command line.
    run_stage bench "$PY" benchmarks/bench_gpu.py --out "$LOGDIR/bench" --lengths 1024,4096,16384 \
      --budget-s $(($(stage_budget bench) - 20))
    SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    for tool in memcheck racecheck; do
      if [[ -x "$SAN" ]]; then
        run_stage "$tool" "$SAN" --tool "$tool" --error-exitcode 3 "$PY" benchmarks/gpu_sanitize.py
      else
        record "$tool" "skipped" 0 0 "compute-sanitizer not found"
      fi
    done
  else
    for name in smoke tests bench memcheck racecheck; do record "$name" "skipped: no build" 0 "$(stage_budget "$name")" ""; done
  fi
fi

"$PY" - "$STAGES" "$LOGDIR" "$REPORT_DIR" "$ARCH_TAG" "$BUDGET" "$(elapsed)" "$GPU" "$VERSIONS" <<'EOF'
import json, os, sys
stages_path, logdir, report_dir, arch, budget, took, gpu, versions = sys.argv[1:]
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import harness

stages = []
for line in open(stages_path):
    name, status, secs, stage_budget, detail = line.rstrip("\n").split("\t")
    stages.append({"stage": name, "status": status, "seconds": int(secs), "budget_s": int(stage_budget), "detail": detail})
bench_json = os.path.join(logdir, "bench", "gpu_report.json")
bench = json.load(open(bench_json)) if os.path.exists(bench_json) else None
env = harness.finish(harness.environment(["benchmarks/gpu_check.sh"]))
report = {"arch": arch, "gpu": gpu, "versions": versions, "budget_s": int(budget), "seconds": int(took),
          "logs": logdir, "stages": stages, "benchmark": bench, "environment": env}
lines = [f"# avar GPU check ({arch})", "", *harness.environment_lines(env),
         f"- Python packages: {versions}",
         f"- {took} s of a {budget} s budget; full logs in {logdir}", "", "## Stages", ""]
lines += harness.markdown_table(["stage", "status", "s", "budget s", "detail"],
                                [[s["stage"], s["status"], s["seconds"], s["budget_s"], s["detail"]] for s in stages],
                                "llrrl")
bench_md = os.path.join(logdir, "bench", "gpu_report.md")
if os.path.exists(bench_md):
    lines += ["", "## Benchmark (benchmarks/bench_gpu.py)", ""]
    lines += ["##" + l if l.startswith("#") else l for l in open(bench_md).read().splitlines()]
paths = harness.write_report(report_dir, f"gpu_report_{arch}", report, "\n".join(lines))
print("report: " + " and ".join(paths))
EOF
REPORT_RC=$?
log "done in $(elapsed) s of $BUDGET s"
[[ $REPORT_RC -eq 0 ]] || exit 1
# A failed stage, or a build, smoke test or test run that ran out of time, fails the check.
if awk -F'\t' '$2 ~ /^failed/ || ($2 == "timed out" && ($1 == "build" || $1 == "smoke" || $1 == "tests")) { bad = 1 }
                END { exit bad ? 0 : 1 }' "$STAGES"; then
  exit 1
fi
exit 0
