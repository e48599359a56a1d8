"""The benchmark harness: FLOP counts, repeat budgeting, ratios, environment capture and reports (no timing is
asserted: speed is shown by the benchmarks themselves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import harness

# The scripts run as a user runs them, from the repository root, importing this checkout's avar_ops.
ENV = {**os.environ, "PYTHONPATH": harness.ROOT}


def test_flops_follow_flashattention():
    # 4·B·H·Lq·Lk·D for the forward, half of it causal; the backward 2.5× the forward.
    assert harness.attention_flops(2, 3, 5, 7, 11, causal=False, phase="fwd") == 4 * 2 * 3 * 5 * 7 * 11
    fwd = harness.attention_flops(1, 28, 1024, 1024, 128, causal=True, phase="fwd")
    assert fwd == 2 * 28 * 1024 * 1024 * 128
    assert harness.attention_flops(1, 28, 1024, 1024, 128, causal=True, phase="bwd") == 2.5 * fwd
    assert harness.attention_flops(1, 28, 1024, 1024, 128, causal=True, phase="fwd_bwd") == 3.5 * fwd


def test_measure_calls_within_repeat_and_budget():
    calls = []
    t = harness.measure(lambda: calls.append(1), repeat=4, warmup=2, budget_s=60.0)
    assert len(t.samples) == 4 and len(calls) == 6  # two warm-up calls, four timed
    assert min(t.samples) <= t.median <= max(t.samples)

    def slow():
        calls.append(1)
        sum(range(200_000))

    calls.clear()
    t = harness.measure(slow, repeat=50, warmup=1, budget_s=1e-9, min_repeat=3)
    assert len(t.samples) == 3  # a budget smaller than one call still gets min_repeat calls


def test_speedups_are_baseline_time_over_ours():
    s = harness.speedups({"avar": 1.0, "sdpa": 2.0, "eager": None}, "avar", ["sdpa", "eager", "flex"])
    assert s == {"sdpa": 2.0}
    assert harness.speedups({"sdpa": 2.0}, "avar", ["sdpa"]) == {}


def test_environment_records_commit_machine_and_command(tmp_path):
    env = harness.finish(harness.environment(["--lengths", "512", "a b"]))
    for key in (
        "git",
        "command",
        "date_utc",
        "cpu",
        "threads",
        "load_average_start",
        "load_average_end",
        "gpu",
        "versions",
        "avar",
    ):
        assert key in env, key
    assert env["command"].endswith("--lengths 512 'a b'")
    assert set(env["cpu"]["flags"]) == set(harness.ISA_FLAGS)
    assert env["versions"]["torch"] and env["avar"]["version"]
    json.dumps(env)  # the report's JSON holds it as is
    lines = harness.environment_lines(env)
    assert any(line.startswith("- Command: `") for line in lines)
    json_path, md_path = harness.write_report(str(tmp_path), "r", {"environment": env}, "# title")
    assert json.load(open(json_path))["environment"]["command"] == env["command"]
    assert open(md_path).read() == "# title\n"


def test_markdown_table_aligns_columns():
    lines = harness.markdown_table(["a", "b", "c"], [[1, 2, 3]], "lrl")
    assert lines == ["| a | b | c |", "|---|---:|---|", "| 1 | 2 | 3 |"]


def test_gpu_benchmark_dry_run_writes_the_skeleton(tmp_path):
    """What gpu_check.sh falls back to when no time is left, and the check of the plan without a GPU."""
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--out", str(tmp_path), "--dry-run", "--lengths", "1024,2048"],
        capture_output=True,
        text=True,
        cwd=harness.ROOT,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    report = json.load(open(tmp_path / "gpu_report.json"))
    assert "python benchmarks/bench_gpu.py --out" in report["environment"]["command"]
    assert {r["note"] for r in report["results"]} == {"not run"}
    assert "# avar GPU check" in (tmp_path / "gpu_report.md").read_text()


@pytest.mark.parametrize(
    "script, args",
    [
        ("bench_backward.py", ["--name", "../escape"]),
        ("bench_attention.py", ["--lengths", "0"]),
        ("bench_decode.py", ["--name", "../escape"]),
        ("bench_decode.py", ["--caches", "0"]),
        ("compare_builds.py", ["--baseline", "/nonexistent"]),
        ("bench_gpu.py", ["--out", "x", "--lengths", "1000", "--tokens", "1024"]),
    ],
)
def test_bad_arguments_are_refused_with_a_usage_error(script, args):
    res = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        capture_output=True,
        text=True,
        cwd=harness.ROOT,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
