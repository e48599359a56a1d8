"""CPU backward benchmark: avar's fused attention (bias + masses) trained through, against PyTorch's paths.

Shapes are a Qwen2.5-VL-7B text layer (H = 28, H_kv = 4, D = 128, B = 1), causal. Two timings per method:
the backward alone (the forward's graph is kept and its backward rerun) and forward + backward. Gradients
flow into q, k, v (and avar's bias) from out and, for the methods that produce them, the group masses.
Useful-FLOP GFLOP/s as FlashAttention counts them (forward 4·B·H·L²·D / 2 causal, backward 2.5× that),
ratios against every baseline measured in the same run, and peak resident memory of one forward + backward
in a fresh process. Writes benchmarks/results/cpu_backward.{json,md}.

    python benchmarks/bench_backward.py              # L = 512..4096, fp32 and bf16, 2 threads
    python benchmarks/bench_backward.py --quick      # tiny sizes, no report: checks that everything runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import avar_ops
from avar_ops.reference import NUM_GROUPS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
H, HKV, D, B = 28, 4, 128, 1
METHODS = ["avar", "sdpa_causal", "sdpa_mask", "eager"]
LABELS = {
    "avar": "avar (bias + masses, grads through out and mass)",
    "sdpa_causal": "SDPA is_causal, no bias",
    "sdpa_mask": "SDPA + additive mask",
    "eager": "eager with maps (out and masses)",
}
PHASES = ["bwd", "fwd_bwd"]


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avar": avar_ops.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def make_problem(L: int, dtype: torch.dtype, seed: int = 0):
    """Inputs of one layer: a system prompt, image tokens, user text and an answer; the paper's bias."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=gen).to(dtype)  # [B, L, H, D]
    k = torch.randn(B, L, HKV, D, generator=gen).to(dtype)  # [B, L, Hkv, D]
    v = torch.randn(B, L, HKV, D, generator=gen).to(dtype)  # [B, L, Hkv, D]
    kg = torch.zeros(B, L, dtype=torch.int8)  # [B, L]
    sys_end, img_end = L // 16, L // 16 + L // 2
    kg[:, 1:sys_end] = 2
    kg[:, sys_end + 2:img_end] = 1
    kg[:, img_end + 1:img_end + L // 8] = 3
    bias = torch.zeros(H, NUM_GROUPS)  # [H, G]
    bias[:, 1] = 0.14  # log(1 + 0.15): the paper's image boost
    bias[:, 2] = -0.22  # log(1 - 0.2): system damping
    return q, k, v, kg, bias


def additive_mask(kg, bias, L, dtype):
    """The float mask [B, H, L, L] equal to avar's bias lookup with causality folded in."""
    per_key = bias[:, kg.long().clamp(min=0)].permute(1, 0, 2)  # [B, H, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return per_key[:, :, None, :].expand(-1, -1, L, -1).masked_fill(~causal, float("-inf")).to(dtype).contiguous()


def leaves_bhld(q, k, v):
    """SDPA layout with kv heads expanded (outside the timed region, so PyTorch's flash kernel takes it)."""
    rep = H // HKV
    return [t.requires_grad_(True) for t in (q.transpose(1, 2).contiguous(),
                                               k.transpose(1, 2).repeat_interleave(rep, 1).contiguous(),
                                               v.transpose(1, 2).repeat_interleave(rep, 1).contiguous())]


def build(method: str, L: int, dtype: torch.dtype):
    """forward() -> (outputs, upstream gradients): what backward differentiates, for one method."""
    q, k, v, kg, bias = make_problem(L, dtype)
    gen = torch.Generator().manual_seed(1)
    if method == "avar":
        leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
        dout = torch.randn(q.shape, generator=gen).to(dtype)  # [B, L, H, D]
        dmass = torch.randn(B, H, L, NUM_GROUPS, generator=gen)  # [B, H, L, G]

        def forward():
            res = avar_ops.attention(leaves[0], leaves[1], leaves[2], kg, leaves[3], return_mass=True)
            return (res.out, res.mass), (dout, dmass)

        return forward
    qh, kh, vh = leaves_bhld(q, k, v)
    dout = torch.randn(B, H, L, D, generator=gen).to(dtype)  # [B, H, L, D]
    if method == "sdpa_causal":
        return lambda: ((F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),), (dout,))
    mask = additive_mask(kg, bias, L, dtype)  # built once, outside the timed region
    if method == "sdpa_mask":
        return lambda: ((F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask),), (dout,))
    onehot = F.one_hot(kg.long().clamp(min=0), NUM_GROUPS).to(dtype)[:, None]  # [B, 1, L, G]
    dmass = torch.randn(B, H, L, NUM_GROUPS, generator=gen).to(dtype)  # [B, H, L, G]

    def eager():
        p = torch.softmax((qh @ kh.transpose(-1, -2)) * D**-0.5 + mask, dim=-1)  # [B, H, L, L]
        return (p @ vh, p @ onehot), (dout, dmass)

    return eager


def timed(method, phase, L, dtype):
    forward = build(method, L, dtype)
    if phase == "fwd_bwd":
        def step():
            outs, grads = forward()
            torch.autograd.backward(outs, grads)
        return step
    outs, grads = forward()
    return lambda: torch.autograd.backward(outs, grads, retain_graph=True)


def time_fn(fn, repeat: int, budget_s: float = 90.0) -> float:
    """Median seconds per call after one warm-up (fewer repeats when a call is slow)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, min(repeat, int(budget_s / max(first, 1e-6))))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_flops(L: int) -> float:
    return 4.0 * B * H * L * L * D / 2


def peak_rss_mb(method: str, L: int, threads: int) -> float:
    """Peak resident memory (MB) one fp32 forward + backward adds, in a fresh interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    prog = (
        "import resource, sys, torch\n"
        f"torch.set_num_threads({threads})\n"
        f"sys.path.insert(0, {here!r})\n"
        "import bench_backward as bb\n"
        f"fn = bb.timed({method!r}, 'fwd_bwd', {L}, torch.float32)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "fn()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return float(res.stdout.strip().splitlines()[-1])


def run(lengths, dtypes, repeat, methods, memory_lengths, threads):
    rows = []
    for dtype in dtypes:
        for L in lengths:
            for phase in PHASES:
                flops = fwd_flops(L) * (2.5 if phase == "bwd" else 3.5)
                row = {"dtype": str(dtype).replace("torch.", ""), "L": L, "phase": phase, "gflops": {},
                       "seconds": {}, "errors": {}}
                for m in methods:
                    try:
                        sec = time_fn(timed(m, phase, L, dtype), repeat)
                        row["seconds"][m], row["gflops"][m] = sec, flops / sec / 1e9
                    except Exception as e:  # a baseline that cannot run here is reported, not hidden
                        row["errors"][m] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"{row['dtype']:>8} L={L:5d} {phase:7s} {m:12s} "
                          + (f"{row['gflops'][m]:7.1f} GFLOP/s" if m in row["gflops"] else row["errors"][m]),
                          flush=True)
                ours = row["gflops"].get("avar")
                row["ratio"] = {m: ours / g for m, g in row["gflops"].items() if m != "avar" and ours}
                rows.append(row)

    memory = []
    for L in memory_lengths:
        entry = {"L": L, "peak_mb": {}}
        for m in ("avar", "sdpa_causal", "sdpa_mask", "eager"):
            maps_gb = H * L * L * 4 * 4 / 1e9  # mask, scores, probabilities and their gradient
            if m in ("sdpa_mask", "eager") and maps_gb > 12:
                entry["peak_mb"][m] = None
                continue
            entry["peak_mb"][m] = peak_rss_mb(m, L, threads)
        memory.append(entry)
        print(f"memory L={L}: " + ", ".join(f"{m} {v:.0f} MB" if v is not None else f"{m} skipped (> 12 GB)"
                                           for m, v in entry["peak_mb"].items()), flush=True)
    return rows, memory


def markdown(info, rows, memory, command) -> str:
    baselines = [m for m in METHODS if m != "avar"]
    lines = [
        "# CPU backward: avar fused attention vs PyTorch", "",
        f"Machine: {info['cpu']}, {info['threads']} threads; torch {info['torch']} "
        f"({info['torch_cpu_capability']}), avar {info['avar']}, Python {info['python']}; {info['date']}.", "",
        f"Command: `{command}`", "",
        "Qwen2.5-VL-7B text layer: B = 1, H = 28, H_kv = 4, D = 128, causal. Useful GFLOP/s: forward "
        "4·H·L²·D / 2, backward 2.5× that, forward + backward 3.5×. avar applies the per-(head, group) bias and "
        "back-propagates from out and the 4 group masses into q, k, v and the bias. SDPA is_causal has no bias "
        "(PyTorch's CPU flash kernel, the ceiling); SDPA + mask and eager apply the same bias as a float mask "
        "built outside the timed region (no gradient into it); eager also returns and back-propagates masses. "
        "SDPA and eager get kv heads expanded to H outside the timed region.", "",
        "| dtype | L | phase | " + " | ".join(LABELS[m] for m in METHODS) + " | "
        + " | ".join(f"avar / {LABELS[m].split(',')[0].split(' (')[0]}" for m in baselines) + " |",
        "|---|---:|---|" + "---:|" * (len(METHODS) + len(baselines)),
    ]
    for r in rows:
        cells = [f"{r['gflops'][m]:.1f}" if m in r["gflops"] else "n/a" for m in METHODS]
        ratios = [f"{r['ratio'][m]:.2f}×" if m in r["ratio"] else "n/a" for m in baselines]
        lines.append(f"| {r['dtype']} | {r['L']} | {r['phase']} | " + " | ".join(cells) + " | "
                     + " | ".join(ratios) + " |")
    errors = [(r["dtype"], r["L"], r["phase"], m, e) for r in rows for m, e in r["errors"].items()]
    if errors:
        lines += ["", "Baselines that could not run:", ""]
        lines += [f"- {d} L={L} {ph} {LABELS[m]}: {e}" for d, L, ph, m, e in errors]
    if memory:
        lines += ["", "Peak resident memory added by one fp32 forward + backward (MB, fresh process):", "",
                  "| L | " + " | ".join(LABELS[m] for m in METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
        for e in memory:
            cells = [f"{e['peak_mb'][m]:.0f}" if e["peak_mb"][m] is not None else "skipped (> 12 GB)"
                     for m in METHODS]
            lines.append(f"| {e['L']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no report: checks that everything runs")
    ap.add_argument("--name", default="cpu_backward", help="report file name under benchmarks/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeat, args.memory_lengths = [256], 1, [256]
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    info = machine_info()
    rows, memory = run(args.lengths, dtypes, args.repeat, args.methods, args.memory_lengths, args.threads)
    command = "python benchmarks/bench_backward.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(info, rows, memory, command.strip())
    print(md)
    if not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
            json.dump({"machine": info, "command": command, "results": rows, "memory": memory}, f, indent=2)
        with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
            f.write(md)
        print(f"wrote {RESULTS}/{args.name}.json and .md")


if __name__ == "__main__":
    main()
