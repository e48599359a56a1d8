#!/usr/bin/env python3
"""Two source trees, one run: times avar_ops.attention as imported from a baseline tree and from a candidate tree.

Each tree runs in its own worker process with PYTHONPATH pointing at it, so that tree's Python wrapper and its
compiled extension load. The workers take turns, case by case and round after round, so that a change of load on
a shared machine hits both alike; each case reports the median and the fastest time of each tree, the median (and
range) of the per-round ratios candidate / baseline (> 1: the candidate is slower) and the ratio of the fastest
calls. Small shapes, where the wrapper's per-call overhead shows, come first: decode (Lq = 1), then prompt
lengths up to 2048, then forward + backward.

    OMP_NUM_THREADS=2 python benchmarks/compare_builds.py --baseline /tmp/avar-old            # candidate: this tree
    OMP_NUM_THREADS=2 python benchmarks/compare_builds.py --baseline OLD --candidate NEW --rounds 7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys

import torch
from tqdm import tqdm

import harness

DTYPES = ("float32", "bfloat16")


def default_cases() -> list:
    """(phase, dtype, len_q, len_k): decode and short prompts first, where per-call overhead weighs most."""
    cases = [("fwd", d, 1, L) for d in DTYPES for L in (512, 1024, 4096)]
    cases += [("fwd", d, L, L) for d in DTYPES for L in (512, 1024, 2048)]
    cases += [("fwd_bwd", d, L, L) for d in DTYPES for L in (512, 1024)]
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Worker: runs inside one tree, answers one JSON request per line.


def _worker_fn(phase: str, dtype: str, len_q: int, len_k: int):
    import avar_ops

    from problems import make_problem

    q, k, v, kg, bias = make_problem(len_k, getattr(torch, dtype), len_q=len_q)
    if phase == "fwd":
        return lambda: avar_ops.attention(q, k, v, kg, bias, return_mass=True)
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen).to(q.dtype)  # [B, Lq, H, D]
    dmass = torch.randn(q.shape[0], q.shape[2], len_q, bias.shape[1], generator=gen)  # [B, H, Lq, G]

    def step():
        res = avar_ops.attention(leaves[0], leaves[1], leaves[2], kg, leaves[3], return_mass=True)
        torch.autograd.backward((res.out, res.mass), (dout, dmass))

    return step


def worker(threads: int) -> int:
    import avar_ops

    torch.set_num_threads(threads)
    fns = {}
    print(json.dumps({"avar_path": os.path.dirname(os.path.abspath(avar_ops.__file__))}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        case = tuple(req["case"])
        if case not in fns:
            fns[case] = _worker_fn(*case)
        t = harness.measure(fns[case], repeat=req["repeat"], warmup=req["warmup"], budget_s=req["budget_s"])
        print(json.dumps({"samples": t.samples}), flush=True)
    return 0


class Worker:
    """A worker process importing avar_ops from `tree`."""

    def __init__(self, tree: str, threads: int):
        self.tree = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([self.tree, harness.BENCH_DIR]))
        # -P: the script's own folder does not go first on sys.path, so avar_ops comes from the tree alone.
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.avar_path = hello["avar_path"]
        if os.path.commonpath([self.avar_path, self.tree]) != self.tree:
            self.close()
            raise RuntimeError(f"{self.tree}: avar_ops was imported from {self.avar_path}, not from this tree")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.tree} stopped (exit code {self.proc.wait()})")
        return json.loads(line)

    def time(self, case, repeat: int, warmup: int, budget_s: float) -> list:
        req = {"case": list(case), "repeat": repeat, "warmup": warmup, "budget_s": budget_s}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()["samples"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# Coordinator.


def tree_info(tree: str, avar_path: str) -> dict:
    """The tree's commit and the checksum of the extension it loads (equal checksums: the same kernels)."""
    ext = sorted(f for f in os.listdir(avar_path) if re.fullmatch(r"_C\..*\.so", f))
    digest = None
    if ext:
        with open(os.path.join(avar_path, ext[0]), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {
        "path": os.path.abspath(tree),
        "git": harness.git_state(tree),
        "avar_path": avar_path,
        "extension_sha256": digest,
    }


def compare(baseline: str, candidate: str, cases, rounds: int, threads: int, budget_s: float) -> tuple:
    workers = {"baseline": Worker(baseline, threads), "candidate": Worker(candidate, threads)}
    trees = {name: tree_info(w.tree, w.avar_path) for name, w in workers.items()}
    per_round = {case: {"baseline": [], "candidate": []} for case in cases}
    samples = {case: {"baseline": [], "candidate": []} for case in cases}
    try:
        for r in tqdm(range(rounds), desc="rounds", unit="round"):
            for case in cases:
                # Alternate who goes first so neither tree always runs right after the other's cache misses.
                order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
                for name in order:
                    s = workers[name].time(case, repeat=50, warmup=2 if r == 0 else 1, budget_s=budget_s)
                    per_round[case][name].append(statistics.median(s))
                    samples[case][name].extend(s)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for case in cases:
        phase, dtype, len_q, len_k = case
        base, cand = per_round[case]["baseline"], per_round[case]["candidate"]
        ratios = [c / b for b, c in zip(base, cand)]
        rows.append(
            {
                "phase": phase,
                "dtype": dtype,
                "len_q": len_q,
                "len_k": len_k,
                "baseline_s": statistics.median(samples[case]["baseline"]),
                "candidate_s": statistics.median(samples[case]["candidate"]),
                # The fastest call is the one least disturbed by other work on a shared machine.
                "baseline_min_s": min(samples[case]["baseline"]),
                "candidate_min_s": min(samples[case]["candidate"]),
                "samples_s": samples[case],
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "per_round_s": per_round[case],
                "calls": {n: len(samples[case][n]) for n in ("baseline", "candidate")},
            }
        )
    return trees, rows


def markdown(env: dict, trees: dict, rows: list, rounds: int) -> str:
    lines = ["# CPU: the same kernels through two builds of the Python wrapper", "", *harness.environment_lines(env)]
    for name in ("baseline", "candidate"):
        t = trees[name]
        dirty = " with uncommitted changes" if t["git"]["dirty"] else ""
        lines.append(
            f"- {name.capitalize()}: `{t['path']}` at {(t['git']['commit'] or 'unknown')[:12]}{dirty}, extension "
            f"sha256 {(t['extension_sha256'] or 'none')[:16]}"
        )
    same = trees["baseline"]["extension_sha256"] == trees["candidate"]["extension_sha256"]
    lines += [
        "",
        "avar_ops.attention with masses (and, for fwd_bwd, the backward into q, k, v and the bias), B = 1, H = 28, "
        "H_kv = 4, D = 128, causal; Lq = 1 is a decode step over Lk cached keys. Each tree runs in its own process; "
        f"the two take turns case by case over {rounds} rounds. Times: median and fastest of all timed calls (the "
        "fastest is the least disturbed by other work on a shared machine); ratios, > 1 when the candidate is "
        "slower: the median (min–max) over the rounds of the per-round median times, and the ratio of the fastest "
        "calls."
        + (" Both trees load the same extension binary, so any difference is the Python wrapper." if same else ""),
        "",
    ]
    table = [
        [
            r["phase"],
            r["dtype"],
            r["len_q"],
            r["len_k"],
            f"{r['baseline_s'] * 1e3:.3f} / {r['baseline_min_s'] * 1e3:.3f}",
            f"{r['candidate_s'] * 1e3:.3f} / {r['candidate_min_s'] * 1e3:.3f}",
            f"{r['ratio_median']:.3f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})",
            f"{r['candidate_min_s'] / r['baseline_min_s']:.3f}",
        ]
        for r in rows
    ]
    headers = [
        "phase",
        "dtype",
        "Lq",
        "Lk",
        "baseline ms (median / min)",
        "candidate ms (median / min)",
        "candidate / baseline, per round",
        "candidate / baseline, min",
    ]
    lines += harness.markdown_table(headers, table, "llrrrrrr")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="source tree with a built extension (avar_ops/_C*.so)")
    ap.add_argument("--candidate", default=harness.ROOT, help="source tree to compare (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per case, tree and round (at most)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="two small cases, one round, no report")
    ap.add_argument("--name", default="cpu_builds", help="report file name under benchmarks/results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    for flag in ("baseline", "candidate"):
        tree = getattr(args, flag)
        if tree is None or not os.path.isdir(os.path.join(tree, "avar_ops")):
            ap.error(f"--{flag} must be a source tree holding avar_ops/, got {tree!r}")
    if args.rounds < 1 or args.threads < 1 or args.budget_s <= 0:
        ap.error(
            f"--rounds, --threads and --budget-s must be positive, got {args.rounds}, {args.threads}, {args.budget_s}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", args.name):
        ap.error(f"--name must be a plain file name (letters, digits, _ . -), got {args.name!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.threads)
    torch.set_num_threads(args.threads)
    env = harness.environment(argv)
    cases = [("fwd", "float32", 1, 512), ("fwd_bwd", "float32", 256, 256)] if args.quick else default_cases()
    rounds = 1 if args.quick else args.rounds
    trees, rows = compare(args.baseline, args.candidate, cases, rounds, args.threads, args.budget_s)
    harness.finish(env)
    report = markdown(env, trees, rows, rounds)
    print(report)
    if not args.quick:
        payload = {"environment": env, "trees": trees, "rounds": rounds, "results": rows}
        print("wrote " + " and ".join(harness.write_report(harness.RESULTS, args.name, payload, report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
