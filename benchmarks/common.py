"""Shared pieces of the CPU benchmarks: problem setup, the baselines, timing, peak memory and the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import avar_ops
from avar_ops.core import NUM_GROUPS, load_extension

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avar": avar_ops.__version__,
        "avar_cpu_isa": load_extension().cpu_capability,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def make_problem(L: int, dtype: torch.dtype, H: int = 28, Hkv: int = 4, D: int = 128, B: int = 1, seed: int = 0):
    """A Qwen2.5-VL-7B-shaped text layer: system prompt, image tokens, user text, answer."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=gen).to(dtype)  # [B, L, H, D]
    k = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)  # [B, L, Hkv, D]
    v = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)  # [B, L, Hkv, D]
    kg = torch.zeros(B, L, dtype=torch.int8)  # [B, L]
    sys_end, img_end = L // 16, L // 16 + L // 2
    kg[:, 1:sys_end] = 2
    kg[:, sys_end + 2:img_end] = 1
    kg[:, img_end + 1:img_end + L // 8] = 3
    bias = torch.zeros(H, NUM_GROUPS)  # [H, G]
    bias[:, 1] = 0.14  # log(1 + 0.15): the paper's image boost
    bias[:, 2] = -0.22  # log(1 - 0.2): system damping
    return q, k, v, kg, bias


def additive_mask(kg: torch.Tensor, bias: torch.Tensor, L: int, dtype) -> torch.Tensor:
    """The float mask [B, H, L, L] equal to our bias lookup with causality folded in."""
    per_key = bias[:, kg.long().clamp(min=0)].permute(1, 0, 2)  # [B, H, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = per_key[:, :, None, :].expand(-1, -1, L, -1).masked_fill(~causal, float("-inf"))
    return mask.to(dtype).contiguous()  # [B, H, L, L]


def to_bhld(q, k, v, H):
    """SDPA layout with kv heads expanded (outside the timed region) so PyTorch's flash kernel takes it."""
    rep = H // k.shape[2]
    return (q.transpose(1, 2).contiguous(), k.transpose(1, 2).repeat_interleave(rep, 1).contiguous(),
            v.transpose(1, 2).repeat_interleave(rep, 1).contiguous())


def eager_with_maps(qh, kh, vh, mask, group_onehot):
    s = (qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5 + mask  # [B, H, L, L]
    p = torch.softmax(s, dim=-1)
    return p @ vh, p @ group_onehot  # out [B, H, L, D], masses [B, H, L, G]


def flex_callable(kg, bias, H):
    """FlexAttention, compiled, with the equivalent score_mod and a causal BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = kg.shape[1]
    groups = kg[0].long().clamp(min=0)
    table = bias.clone()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, groups[kv_idx]]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda qh, kh, vh: compiled(qh, kh, vh, score_mod=score_mod, block_mask=block_mask)


def time_fn(fn, repeat: int, warmup: int = 1, budget_s: float = 60.0) -> float:
    """Median seconds per call (fewer repeats when a call is slow, to stay within budget_s)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    n = max(1, min(repeat, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def causal_fwd_flops(B, H, L, D) -> float:
    """FlashAttention's count: 4·B·H·Lq·Lk·D, halved for a causal mask."""
    return 4.0 * B * H * L * L * D / 2


def causal_bwd_flops(B, H, L, D) -> float:
    """FlashAttention's count for the backward: 2.5× the forward (five L×L GEMMs against the forward's two)."""
    return 2.5 * causal_fwd_flops(B, H, L, D)


def time_methods(row: dict, methods, make_fn, flops: float, repeat: int, tag: str, warmup=None,
                 budget_s: float = 60.0) -> dict:
    """Times each method into row["seconds"] / row["gflops"] (or row["errors"]), then row["ratio"]: avar's
    GFLOP/s over each baseline's. make_fn(method) builds the timed callable; tag starts each printed line."""
    for m in methods:
        try:
            sec = time_fn(make_fn(m), repeat, warmup=(warmup or {}).get(m, 1), budget_s=budget_s)
            row["seconds"][m], row["gflops"][m] = sec, flops / sec / 1e9
        except Exception as e:  # a baseline that cannot run here is reported, not hidden
            row["errors"][m] = f"{type(e).__name__}: {str(e)[:200]}"
        print(f"{tag} {m:12s} " + (f"{row['gflops'][m]:7.1f} GFLOP/s" if m in row["gflops"] else row["errors"][m]),
              flush=True)
    ours = row["gflops"].get("avar")
    row["ratio"] = {m: ours / g for m, g in row["gflops"].items() if m != "avar" and ours}
    return row


def measure_memory(lengths, methods, needs_gb, peak_mb, limit_gb: float = 12.0) -> list:
    """Peak memory per length and method; a method whose estimated need needs_gb(m, L) passes limit_gb is
    recorded as None rather than run (it would swap or be killed)."""
    memory = []
    for L in lengths:
        entry = {"L": L, "peak_mb": {}}
        for m in methods:
            entry["peak_mb"][m] = None if needs_gb(m, L) > limit_gb else peak_mb(m, L)
        memory.append(entry)
        print(f"memory L={L}: " + ", ".join(f"{m} {v:.0f} MB" if v is not None else f"{m} skipped (> {limit_gb:g} GB)"
                                           for m, v in entry["peak_mb"].items()), flush=True)
    return memory


def peak_rss_mb_of(code: str, env=None, setup: str = "") -> float:
    """Peak resident memory (MB) that running `code` adds, in a fresh interpreter.

    The kernel's high-water mark (VmHWM) is reset after the imports and `setup` (writing 5 to
    /proc/self/clear_refs), so neither the import's transient peak nor what `setup` builds counts.
    """
    prog = (
        "import torch, avar_ops, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from common import *\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1]) / 1024\n"
        f"{setup}\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS:')\n"
        f"{code}\n"
        "print(status('VmHWM:') - base)\n"
    )
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return float(res.stdout.strip().splitlines()[-1])


def error_lines(rows, labels) -> list:
    """The report's list of baselines that could not run (nothing when all ran)."""
    errors = [(r, m, e) for r in rows for m, e in r["errors"].items()]
    if not errors:
        return []
    return ["", "Baselines that could not run:", ""] + [
        f"- {r['dtype']} L={r['L']}" + (f" {r['phase']}" if "phase" in r else "") + f" {labels[m]}: {e}"
        for r, m, e in errors]


def memory_lines(memory, methods, title: str, headers) -> list:
    """The report's peak-memory table, one row per length (nothing when memory was not measured)."""
    if not memory:
        return []
    lines = ["", title, "", "| L | " + " | ".join(headers) + " |", "|---:|" + "---:|" * len(methods)]
    for e in memory:
        cells = [f"{e['peak_mb'][m]:.0f}" if e["peak_mb"][m] is not None else "skipped (> 12 GB)" for m in methods]
        lines.append(f"| {e['L']} | " + " | ".join(cells) + " |")
    return lines


def arg_parser(doc: str, methods, report_name: str) -> argparse.ArgumentParser:
    """The flags both benchmarks take; parse with parse_args below so --quick applies."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=methods, choices=methods)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no report: checks that everything runs")
    ap.add_argument("--name", default=report_name, help="report file name under benchmarks/results")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeat, args.memory_lengths = [256], 1, [256]
    args.dtypes = [getattr(torch, d) for d in args.dtypes]
    return args


def write_report(name: str, payload: dict, markdown: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(f"wrote {RESULTS}/{name}.json and .md")


def command_line(script: str, argv) -> str:
    """How this run was started, thread count included (it decides every number in the report)."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/{script} {args}".strip()


def publish(args, info: dict, command: str, rows, memory, markdown: str) -> None:
    """Prints the report; writes it too unless this was a --quick smoke run."""
    print(markdown)
    if not args.quick:
        write_report(args.name, {"machine": info, "command": command, "results": rows, "memory": memory}, markdown)
