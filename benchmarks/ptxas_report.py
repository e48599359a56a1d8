"""Registers, register spills and local memory of every CUDA kernel for the target archs.

Compiles each csrc/attention/cuda/*.cu of a source tree (this checkout by default) with the build's nvcc flags and
writes NAME.json / NAME.md into OUT: per kernel and arch, ptxas's registers, stack frame and spill bytes
(-Xptxas -v), and the st.local / ld.local instructions of its PTX (arrays that nvcc put in local memory before
register allocation: a work array indexed at run time, which ptxas does not count as a spill). With
--fail-on-spill it exits 1 when any kernel spills, has a stack frame or touches local memory
(scripts/check_spills.sh, run by CI). Needs nvcc, not a GPU.

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
PTX_ENTRY = re.compile(r"^\s*(?:\.(?:visible|weak)\s+)?\.entry\s+([A-Za-z0-9_$]+)\s*\(", re.M)
PTX_ST_LOCAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?st\.local\b", re.M)
PTX_LD_LOCAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.local\b", re.M)


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
    keep = os.path.join(scratch, os.path.basename(cu))
    os.makedirs(keep, exist_ok=True)
    obj = os.path.join(keep, "out.o")
    cmd = [nvcc, *NVCC_FLAGS, *gencode, "-keep", "-keep-dir", keep, "-c", cu, "-o", obj]
    run = subprocess.run(cmd, capture_output=True, text=True)
    local = {}
    for ptx in glob.glob(os.path.join(keep, "*.compute_*.ptx")):
        arch = "sm_" + ptx.rsplit(".compute_", 1)[1].split(".")[0]
        with open(ptx) as f:
            local.update({(k, arch): v for k, v in ptx_local_ops(f.read()).items()})
    return cu, run.returncode, run.stdout + run.stderr, local


def ptx_local_ops(ptx: str) -> dict:
    """{kernel: (st.local count, ld.local count)} over the .entry functions of one PTX file."""
    starts = [(m.start(), m.group(1)) for m in PTX_ENTRY.finditer(ptx)]
    out = {}
    for i, (pos, name) in enumerate(starts):
        body = ptx[pos : starts[i + 1][0] if i + 1 < len(starts) else len(ptx)]
        out[name] = (len(PTX_ST_LOCAL.findall(body)), len(PTX_LD_LOCAL.findall(body)))
    return out


def uses_local_memory(row: dict) -> bool:
    return bool(row["spill_stores"] or row["spill_loads"] or row["stack"] or row["st_local"] or row["ld_local"])


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
        for cu, rc, log, local in pool.map(lambda cu: compile_one(nvcc, cu, args.archs, scratch), sources):
            if rc != 0:
                print(log, file=sys.stderr)
                fail(f"nvcc failed on {cu} (its output is above)")
            for r in parse(os.path.relpath(cu, args.root), log):
                if (r["kernel"], r["arch"]) not in local:
                    fail(f"no PTX of {r['kernel']} for {r['arch']} among nvcc's kept files of {cu}")
                r["st_local"], r["ld_local"] = local[(r["kernel"], r["arch"])]
                rows.append(r)
    names = demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["kernel"]]
    spilling = [r for r in rows if uses_local_memory(r)]
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
    lines = [f"# Registers, spills and local memory of the CUDA kernels ({args.archs})", ""]
    lines += harness.environment_lines(env)
    lines += [
        f"- Kernels compiled from the tree at {tree}, with {version} and `{' '.join(NVCC_FLAGS)}`",
        f"- {len(rows)} kernels, {len(spilling)} of them use local memory (spills, a stack frame, or st/ld.local"
        " in the PTX)",
        "",
    ]
    cells = [
        [
            r["kernel"],
            r["arch"],
            r["registers"],
            r["stack"],
            r["spill_stores"],
            r["spill_loads"],
            r["st_local"],
            r["ld_local"],
        ]
        for r in sorted(rows, key=lambda r: (r["source"], r["kernel"], r["arch"]))
    ]
    headers = ["kernel", "arch", "registers", "stack bytes", "spill stores", "spill loads", "PTX st.local", "ld.local"]
    lines += harness.markdown_table(headers, cells, "ll" + "r" * 6)
    json_path, md_path = harness.write_report(args.out, args.name, payload, "\n".join(lines))
    print(f"[avar] {len(rows)} kernels, {len(spilling)} use local memory: {md_path}")
    for r in spilling:
        print(
            f"[avar]   local memory: {r['kernel']} on {r['arch']}: spills {r['spill_stores']} / {r['spill_loads']}"
            f" bytes, stack {r['stack']} bytes, PTX st.local {r['st_local']} / ld.local {r['ld_local']}"
        )
    return 1 if spilling and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
