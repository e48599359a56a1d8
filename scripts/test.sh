#!/usr/bin/env bash
# The test command: sets up .venv, builds the extension, runs the lint and format checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/lint.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m pytest -q -ra tests "$@"
