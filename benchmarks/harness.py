"""The benchmarks' one harness, CPU and GPU alike: timing, FLOP counts, the environment a number was measured in,
and the report.

Every report is a JSON (all measurements and the environment) with a Markdown summary next to it. Both record
the commit (and whether the tree had uncommitted changes), the machine, its ISA, the thread count, the load
average, the GPU, the versions and the exact command, so that a committed number can be traced and re-run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "results")

# The CPU features the kernels (or oneDNN under PyTorch's baselines) dispatch on.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Environment variables that change what a benchmark measures; the command line records those that are set.
COMMAND_ENV = (
    "PYTHONPATH",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "AVAR_CPU_CAPABILITY",
    "AVAR_CUDA_ARCHS",
)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def attention_flops(batch: int, heads: int, len_q: int, len_k: int, dim: int, *, causal: bool, phase: str) -> float:
    """FlashAttention's count: forward 4·B·H·Lq·Lk·D (two GEMMs), halved when causal; the backward 2.5× the
    forward (five GEMMs); forward + backward 3.5×."""
    fwd = 4.0 * batch * heads * len_q * len_k * dim / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[phase]


# ---------------------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    """Seconds per call of the timed repeats (after warm-up)."""

    samples: list

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure(
    fn: Callable[[], object],
    *,
    device: str = "cpu",
    repeat: int = 5,
    warmup: int = 1,
    budget_s: float = 60.0,
    min_repeat: int = 1,
) -> Timing:
    """Times fn: warm-up calls, then between min_repeat and repeat calls, as many as fit in budget_s judged by
    the last warm-up call. On CUDA each call sits between two events and the host synchronises once at the end,
    so launches overlap as they do in a model; on the CPU each call is timed with perf_counter."""
    cuda = torch.device(device).type == "cuda"
    first = 0.0
    for _ in range(max(1, warmup)):
        first = _one_call_s(fn, cuda)
    n = max(min_repeat, min(repeat, int(budget_s / max(first, 1e-6))))
    if not cuda:
        return Timing([_one_call_s(fn, False) for _ in range(n)])
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return Timing([start.elapsed_time(end) / 1e3 for start, end in events])


def _one_call_s(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def speedups(seconds: dict, ours: str, baselines: Sequence[str]) -> dict:
    """Baseline time over ours for every baseline measured (> 1: ours is faster); same work, so also the ratio
    of GFLOP/s."""
    if seconds.get(ours) is None:
        return {}
    return {b: seconds[b] / seconds[ours] for b in baselines if seconds.get(b) is not None}


def time_methods(
    row: dict,
    methods: Sequence[str],
    make_fn: Callable[[str], Callable[[], object]],
    *,
    repeat: int,
    ours: str = "avar",
    warmup: dict | None = None,
    budget_s: float = 60.0,
    device: str = "cpu",
    tag: str = "",
    log: Callable[[str], object] = print,
) -> dict:
    """Times make_fn(m) for every method into row (which holds "flops"): "seconds" (median), "samples",
    "gflops", "errors" (a method that cannot run here is reported, not hidden), and "speedup": each baseline's
    time over ours."""
    for key in ("seconds", "samples", "gflops", "errors"):
        row.setdefault(key, {})
    for m in methods:
        try:
            t = measure(make_fn(m), device=device, repeat=repeat, warmup=(warmup or {}).get(m, 1), budget_s=budget_s)
            row["seconds"][m], row["samples"][m] = t.median, t.samples
            row["gflops"][m] = row["flops"] / t.median / 1e9
            log(f"{tag} {m:12s} {row['gflops'][m]:7.1f} GFLOP/s")
        except Exception as e:  # noqa: BLE001 (any failure of a baseline is a result to report)
            row["errors"][m] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"{tag} {m:12s} {row['errors'][m]}")
    row["speedup"] = speedups(row["seconds"], ours, [m for m in methods if m != ours])
    return row


def process_status_mb(key: str) -> float:
    """A memory line of this process's /proc/self/status ("VmRSS:", "VmHWM:", ...) in MB (KiB / 1024); NaN where
    there is no such line."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(code: str, setup: str = "", env: dict | None = None, timeout_s: float = 900) -> float:
    """Peak resident memory (MB) that running `code` adds, in a fresh interpreter that can import the benchmarks.

    The high-water mark (VmHWM) is reset after torch, the extension and `setup` are loaded (writing 5 to
    /proc/self/clear_refs), so neither their transient peak nor what `setup` builds counts.
    """
    prog = (
        "import torch\n"
        "from avar_ops.core import ensure_loaded\n"
        "ensure_loaded()\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1]) / 1024\n"
        f"{setup}\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS:')\n"
        f"{code}\n"
        "print(status('VmHWM:') - base)\n"
    )
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, BENCH_DIR, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return float(res.stdout.strip().splitlines()[-1])


def peak_memory(lengths, methods, code_of, needs_gb, limit_gb: float = 12.0) -> list:
    """Peak resident memory (MB, see peak_rss_mb) per length and method: code_of(m, L) -> (setup, code).
    A method whose estimated need needs_gb(m, L) passes limit_gb is recorded as None rather than run (it would
    swap or be killed)."""
    from tqdm import tqdm

    memory = []
    for L in tqdm(lengths, desc="memory", unit="length"):
        entry = {"L": L, "limit_gb": limit_gb, "peak_mb": {}}
        for m in methods:
            if needs_gb(m, L) > limit_gb:
                entry["peak_mb"][m] = None
                continue
            setup, code = code_of(m, L)
            entry["peak_mb"][m] = peak_rss_mb(code, setup)
        memory.append(entry)
    return memory


def memory_lines(memory: list, methods, title: str, headers) -> list:
    """The report's peak-memory table, one row per length (nothing when memory was not measured)."""
    if not memory:
        return []
    rows = [
        [e["L"]] + [fmt(e["peak_mb"][m], ".0f", f"skipped (> {e['limit_gb']:g} GB)") for m in methods] for e in memory
    ]
    return ["", title, "", *markdown_table(["L", *headers], rows)]


# ---------------------------------------------------------------------------------------------------------------
# Environment


def git_state(path: str = ROOT) -> dict:
    """The commit checked out at path and whether tracked files differ from it."""

    def git(*args):
        res = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git on this machine
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this run, as it would be typed at the repository root, with the environment
    variables that change its numbers."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT) if sys.argv and sys.argv[0] else "-"
    args = list(sys.argv[1:] if argv is None else argv)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in COMMAND_ENV if k in os.environ]
    return " ".join(env + ["python", shlex.quote(script)] + [shlex.quote(a) for a in args])


def cpu_info() -> dict:
    """CPU model, logical CPUs and the ISA flags that matter here (from lscpu, or /proc/cpuinfo without it)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    if not out:
        try:
            with open("/proc/cpuinfo") as f:
                out = f.read().replace("model name", "Model name").replace("\nflags", "\nFlags")
        except OSError:
            out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            model = value.strip()
        elif key.strip() == "Flags":
            flags = set(value.split())
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "flags": {f: f in flags for f in ISA_FLAGS},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    info = {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "driver": None,
    }
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = res.stdout.strip().splitlines()[0] if res.stdout.strip() else None
    except OSError:
        pass
    return info


def avar_info() -> dict:
    """The avar version, where it was imported from and what its extension was built for (None if not built)."""
    import avar_ops
    from avar_ops.core import load_extension

    path = os.path.dirname(os.path.abspath(avar_ops.__file__))
    info = {"version": avar_ops.__version__, "path": path, "extension_isa": None}
    # A run measures the checkout whose commit it records only if avar_ops is imported from that checkout.
    info["from_this_checkout"] = os.path.commonpath([path, ROOT]) == ROOT
    try:
        ext = load_extension()
        info["extension_isa"] = ext.cpu_capability
        info["extension_cuda"] = bool(getattr(ext, "with_cuda", False))
    except ImportError as e:
        info["extension_error"] = str(e).splitlines()[0]
    return info


def versions() -> dict:
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": tf}


def environment(argv: Sequence[str] | None = None) -> dict:
    """Everything a result depends on besides the code, captured at the start of a run (see `finish`)."""
    return {
        "git": git_state(),
        "command": command_line(argv),
        "python_executable": sys.executable,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpu_info(),
        "versions": versions(),
        "avar": avar_info(),
    }


def finish(env: dict) -> dict:
    """Adds what is known only at the end of a run: its duration and the load average then."""
    start = datetime.strptime(env["date_utc"], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc)
    env["duration_s"] = round((datetime.now(timezone.utc) - start).total_seconds())
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return env


# ---------------------------------------------------------------------------------------------------------------
# Report


def environment_lines(env: dict) -> list:
    """The Markdown lines that say where, on what and by which command a report was measured."""
    git, cpu, ver, avar = env["git"], env["cpu"], env["versions"], env["avar"]
    commit = (git["commit"] or "unknown")[:12] + (" with uncommitted changes" if git["dirty"] else "")
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    gpu = env["gpu"]
    gpu_line = (
        f"{gpu['name']} (sm {gpu['capability']}, {gpu['sms']} SMs, {gpu['memory_gib']} GiB), CUDA {gpu['cuda']}, "
        f"driver {gpu['driver']}"
        if gpu
        else "none"
    )
    load = f"{env['load_average_start']}" + (
        f" at the start, {env['load_average_end']} at the end" if "load_average_end" in env else " at the start"
    )
    return [
        f"- Commit: {commit}; {env['date_utc']}" + (f", {env['duration_s']} s" if "duration_s" in env else ""),
        f"- Command: `{env['command']}`",
        f"- CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, {env['threads']} threads; ISA: torch "
        f"{cpu['torch_capability']}, avar extension {avar.get('extension_isa')}; {flags}",
        f"- Load average (1, 5, 15 min): {load}",
        f"- GPU: {gpu_line}",
        f"- Versions: Python {ver['python']}, torch {ver['torch']}, transformers {ver['transformers']}, "
        f"avar {avar['version']}"
        + ("" if avar["from_this_checkout"] else f" imported from {avar['path']}, outside the checkout measured"),
    ]


def high_load(env: dict) -> bool:
    """Whether other work held at least half the machine's logical CPUs during the run: a 1-minute load average
    above half of them at the start, or above that plus the run's own threads at the end. Timings taken then
    are comparable only within the run."""
    half = env["cpu"]["logical_cpus"] / 2
    start = env["load_average_start"][0] > half
    end = "load_average_end" in env and env["load_average_end"][0] > env["threads"] + half
    return start or end


def high_load_lines(env: dict) -> list:
    """A warning paragraph for a report measured under high load (see `high_load`), else nothing."""
    if not high_load(env):
        return []
    return [
        "",
        f"**Measured at high load** (1-minute load average {env['load_average_start'][0]} at the start, "
        f"{env.get('load_average_end', ['?'])[0]} at the end, on {env['cpu']['logical_cpus']} logical CPUs): other "
        "work shared the cores and the memory bus, so absolute times and rates are not the machine's; only ratios "
        "measured in this same run compare.",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list:
    """A Markdown table; align holds one letter per column, l (text) or r (numbers), default l then r's."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fmt(x, spec: str, missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def write_report(out_dir: str, name: str, payload: dict, markdown: str) -> tuple:
    """Writes OUT_DIR/NAME.json and OUT_DIR/NAME.md (replacing them); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path
