"""Registers and register spills of every CUDA kernel, as ptxas reports them (-Xptxas -v), for the target archs.

Compiles each csrc/attention/cuda/*.cu of a source tree (this checkout by default) with the build's nvcc flags and
writes NAME.json / NAME.md into OUT. With --fail-on-spill it exits 1 when any kernel spills (scripts/check_spills.sh,
run by CI). Needs nvcc, not a GPU.

    python benchmarks/ptxas_report.py --out benchmarks/results [--name cuda_spills] [--archs "8.0;9.0"]
        [--root OTHER_TREE] [--fail-on-spill]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import harness

NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-std=c++17", "-Xptxas", "-v"]
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def fail(msg: str):
    print(f"ptxas_report: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for NAME.json and NAME.md")
    ap.add_argument("--name", default="cuda_spills")
    ap.add_argument("--archs", default=os.environ.get("AVAR_CUDA_ARCHS", "8.0;9.0"))
    ap.add_argument("--root", default=harness.ROOT, help="source tree whose kernels are compiled")
    ap.add_argument("--fail-on-spill", action="store_true")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out: {args.out!r} is a file; expected a folder")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        fail(f"--name: expected letters, digits, '_', '.' or '-', got {args.name!r}")
    if not re.fullmatch(r"\d+\.\d+(;\d+\.\d+)*", args.archs):
        fail(f"--archs: expected compute capabilities like '8.0;9.0', got {args.archs!r}")
    if not glob.glob(os.path.join(args.root, "csrc", "attention", "cuda", "*.cu")):
        fail(f"--root: no csrc/attention/cuda/*.cu under {args.root!r}")
    return args


def nvcc_path() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
    if nvcc is None:
        fail(f"nvcc not found in {home}/bin or on PATH: set CUDA_HOME")
    return nvcc


def demangle(names: list) -> dict:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_one(nvcc: str, cu: str, archs: str, scratch: str) -> tuple:
    gencode = []
    for a in archs.split(";"):
        cc = a.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    obj = os.path.join(scratch, os.path.basename(cu) + ".o")
    run = subprocess.run([nvcc, *NVCC_FLAGS, *gencode, "-c", cu, "-o", obj], capture_output=True, text=True)
    return cu, run.returncode, run.stdout + run.stderr


def parse(source: str, log: str) -> list:
    """One row per (kernel, arch): registers, stack frame and spill bytes."""
    rows, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"source": source, "kernel": m.group(1), "arch": m.group(2)}
        elif current is not None and (m := SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := REGS.search(line)):
            current["registers"] = int(m.group(1))
            rows.append(current)
            current = None
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    nvcc = nvcc_path()
    env = harness.environment(argv)
    sources = sorted(glob.glob(os.path.join(args.root, "csrc", "attention", "cuda", "*.cu")))
    rows = []
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for cu, rc, log in pool.map(lambda cu: compile_one(nvcc, cu, args.archs, scratch), sources):
            if rc != 0:
                print(log, file=sys.stderr)
                fail(f"nvcc failed on {cu} (its output is above)")
            rows += parse(os.path.relpath(cu, args.root), log)
    names = demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["kernel"]]
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    payload = {
        "environment": harness.finish(env),
        "tree": {"root": os.path.abspath(args.root), **harness.git_state(args.root)},
        "nvcc": version,
        "flags": NVCC_FLAGS,
        "archs": args.archs,
        "kernels": rows,
    }
    tree = (payload["tree"]["commit"] or "unknown")[:12]
    lines = [f"# Registers and spills of the CUDA kernels ({args.archs})", "", *harness.environment_lines(env)]
    lines += [
        f"- Kernels compiled from the tree at {tree}, with {version} and `{' '.join(NVCC_FLAGS)}`",
        f"- {len(rows)} kernels, {len(spilling)} of them spill",
        "",
    ]
    cells = [
        [r["kernel"], r["arch"], r["registers"], r["stack"], r["spill_stores"], r["spill_loads"]]
        for r in sorted(rows, key=lambda r: (r["source"], r["kernel"], r["arch"]))
    ]
    headers = ["kernel", "arch", "registers", "stack bytes", "spill stores", "spill loads"]
    lines += harness.markdown_table(headers, cells, "ll" + "r" * 4)
    json_path, md_path = harness.write_report(args.out, args.name, payload, "\n".join(lines))
    print(f"[avar] {len(rows)} kernels, {len(spilling)} spill: {md_path}")
    for r in spilling:
        print(f"[avar]   spills: {r['kernel']} on {r['arch']}: {r['spill_stores']} / {r['spill_loads']} bytes")
    return 1 if spilling and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
