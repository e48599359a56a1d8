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


@pytest.mark.parametrize(
    "start, end, flagged",
    [
        (0.4, 2.3, False),  # quiet: the run's own 2 threads make the end load
        (1.5, 2.0, True),  # others held more than half the 2 CPUs when it started
        (0.2, 3.6, True),  # ... or joined during the run
        (14.6, 15.1, True),
    ],
)
def test_high_load_is_flagged_in_the_report(start, end, flagged):
    env = {"cpu": {"logical_cpus": 2}, "threads": 2, "load_average_start": [start, 1.0, 1.0]}
    env["load_average_end"] = [end, 1.0, 1.0]
    assert harness.high_load(env) is flagged
    lines = harness.high_load_lines(env)
    assert (any("high load" in line for line in lines)) is flagged
    if flagged:
        assert str(start) in lines[-1] and str(end) in lines[-1]


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
    # Both tile shapes and packed / unpacked decode are planned in the same run, per length.
    planned = {(r["direction"], r["method"], r["len_k"]) for r in report["results"]}
    for L in (1024, 2048):
        for d in ("fwd", "bwd"):
            assert {(d, "avar_8x16", L), (d, "avar_4x32", L)} <= planned
        assert {("decode", "avar_packed", L), ("decode", "avar_unpacked", L)} <= planned


def test_gpu_benchmark_help_and_no_tiles(tmp_path):
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--help"], capture_output=True, text=True, cwd=harness.ROOT, env=ENV
    )
    assert res.returncode == 0 and "--tiles" in res.stdout and "--no-tiles" in res.stdout
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_gpu.py",
            "--out",
            str(tmp_path),
            "--dry-run",
            "--lengths",
            "1024",
            "--no-tiles",
        ],
        capture_output=True,
        text=True,
        cwd=harness.ROOT,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    methods = {r["method"] for r in json.load(open(tmp_path / "gpu_report.json"))["results"]}
    assert "avar" in methods and not methods & {"avar_8x16", "avar_4x32", "avar_packed", "avar_unpacked"}


def test_tile_winners_pick_the_faster_of_each_pair():
    import bench_gpu

    def res(method, ms, direction="fwd", L=1024):
        return bench_gpu.Result(direction, method, 16, L, L, ms=ms)

    results = [
        res("avar_8x16", 2.0),
        res("avar_4x32", 1.0),
        res("avar_8x16", 3.0, "bwd"),
        res("avar_4x32", 4.5, "bwd"),
        res("avar_packed", 0.1, "decode"),
        res("avar_unpacked", 0.5, "decode"),
        res("avar_4x32", 1.0, L=2048),  # its partner failed: no winner
        res("avar_mass", 0.01),
    ]
    won = {
        (w["kind"], w["direction"], w["len_k"]): (w["winner"], w["speedup_over_other"])
        for w in bench_gpu.tile_winners(results)
    }
    assert won == {
        ("tile shape", "fwd", 1024): ("4x32", 2.0),
        ("tile shape", "bwd", 1024): ("8x16", 1.5),
        ("decode packing", "decode", 1024): ("packed", 5.0),
    }


def test_ptxas_report_counts_local_memory_in_the_ptx():
    import ptxas_report

    ptx = """
.visible .entry _Z3fooPf(
    .param .u64 _Z3fooPf_param_0
)
{
    .local .align 16 .b8 __local_depot0[64];
    st.local.v4.f32 [%rd1], {%f1, %f2, %f3, %f4};
    @%p1 st.local.f32 [%rd1+16], %f5;
    ld.local.f32 %f6, [%rd2];
    ret;
}
.entry _Z3barPf(
    .param .u64 _Z3barPf_param_0
)
{
    st.shared.f32 [%r1], %f1;
    ld.global.f32 %f2, [%rd1];
    ret;
}
"""
    assert ptxas_report.ptx_local_ops(ptx) == {"_Z3fooPf": (2, 1), "_Z3barPf": (0, 0)}
    row = {"spill_stores": 0, "spill_loads": 0, "stack": 0, "st_local": 0, "ld_local": 0}
    assert not ptxas_report.uses_local_memory(row)
    for key in row:
        assert ptxas_report.uses_local_memory({**row, key: 8}), key


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
