"""benchmarks/gpu_check.sh without a GPU: its dry mode runs every stage as "skipped: no GPU", writes the report
and exits 0 within its budget; it refuses, in one line, a python that lacks the packages it will not install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["build", "smoke", "tests", "bench", "memcheck", "racecheck"]


def _run(tmp_path, *args, python=sys.executable, budget=540):
    env = dict(os.environ, PYTHON=python, GPU_CHECK_REPORT_DIR=str(tmp_path / "report"), GPU_CHECK_BUDGET_S=str(budget))
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", SCRIPT, *args, str(tmp_path / "logs")], capture_output=True, text=True, env=env, timeout=budget
    )
    return res, time.monotonic() - t0


def test_dry_run_skips_every_stage_and_writes_the_report(tmp_path):
    res, took = _run(tmp_path, "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.load(open(tmp_path / "report" / "gpu_report_none.json"))
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert {s["status"] for s in report["stages"]} == {"skipped: no GPU"}
    # The stage budgets add up to the total (up to the rounding of each share).
    total = sum(s["budget_s"] for s in report["stages"])
    assert 540 - len(STAGES) <= total <= 540 == report["budget_s"]
    assert report["seconds"] <= report["budget_s"] and took < 540
    assert "torch " in report["versions"] and "transformers " in report["versions"] and "pytest " in report["versions"]
    md = (tmp_path / "report" / "gpu_report_none.md").read_text()
    assert "# avar GPU check (none)" in md and "| racecheck | skipped: no GPU |" in md
    assert os.path.exists(tmp_path / "logs" / "gpu_check.log")


def test_refuses_a_python_without_the_packages(tmp_path):
    # -S: no site-packages, so torch, transformers and pytest are all missing; nothing may be installed.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    fake.chmod(0o755)
    res, _ = _run(tmp_path, "--dry-run", python=str(fake))
    assert res.returncode == 2
    assert "lacks torch" in res.stderr and "installs nothing" in res.stderr
    assert not (tmp_path / "report").exists() or not os.listdir(tmp_path / "report")


def test_rejects_a_budget_that_is_not_a_number(tmp_path):
    env = dict(os.environ, GPU_CHECK_BUDGET_S="9min", GPU_CHECK_REPORT_DIR=str(tmp_path))
    res = subprocess.run(["bash", SCRIPT, "--dry-run", str(tmp_path / "logs")], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "GPU_CHECK_BUDGET_S must be a whole number of seconds" in res.stderr
