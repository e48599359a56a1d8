#!/usr/bin/env bash
# Lint and format checks (part of the test command): ruff on the Python code, clang-format on csrc/.
# To fix: .venv/bin/ruff format . && .venv/bin/ruff check --fix . && .venv/bin/clang-format -i $(git ls-files 'csrc/*')
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
"$bin/ruff" check --quiet .
"$bin/ruff" format --check --quiet .
mapfile -t cxx < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null || find csrc -type f)
"$bin/clang-format" --dry-run --Werror "${cxx[@]}"
echo "[avar] lint: ruff and clang-format clean"
