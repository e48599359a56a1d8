#!/usr/bin/env bash
# The main job on the embedded default: a tiny random Qwen2.5-VL built on the spot, patched with avar;
# measures VAS and generates with and without the training-free intervention.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >&2
exec .venv/bin/avar demo "$@"
