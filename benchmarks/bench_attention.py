"""CPU forward benchmark: avar's fused attention (bias + masses) against PyTorch's attention paths.

Shapes are a Qwen2.5-VL-7B text layer (H = 28, H_kv = 4, D = 128, B = 1), causal. Prints useful-FLOP
GFLOP/s (causal counts half), ratios against every baseline measured in the same run, and peak memory;
writes benchmarks/results/cpu_attention.{json,md}.

    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py            # L = 512..4096, fp32 and bf16
    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import avar_ops  # noqa: E402
from common import (  # noqa: E402
    additive_mask, causal_fwd_flops, eager_with_maps, flex_callable, machine_info, make_problem, peak_rss_mb_of,
    time_fn, to_bhld, write_report,
)

METHODS = ["avar", "sdpa_causal", "sdpa_mask", "flex", "eager"]
LABELS = {
    "avar": "avar (bias + masses)",
    "sdpa_causal": "SDPA is_causal, no bias",
    "sdpa_mask": "SDPA + additive mask",
    "flex": "FlexAttention score_mod",
    "eager": "eager with maps",
}


def build(method, L, dtype, H=28):
    q, k, v, kg, bias = make_problem(L, dtype, H=H)
    if method == "avar":
        return lambda: avar_ops.attention(q, k, v, kg, bias, return_mass=True)
    qh, kh, vh = to_bhld(q, k, v, H)
    if method == "sdpa_causal":
        return lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    mask = additive_mask(kg, bias, L, dtype)
    if method == "sdpa_mask":
        return lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    if method == "flex":
        fn = flex_callable(kg, bias, H)
        return lambda: fn(qh, kh, vh)
    onehot = torch.nn.functional.one_hot(kg.long().clamp(min=0), 4).to(dtype)[:, None]  # [B, 1, L, G]
    return lambda: eager_with_maps(qh, kh, vh, mask, onehot)


def run(lengths, dtypes, repeat, methods, memory_lengths):
    rows = []
    for dtype in dtypes:
        for L in lengths:
            flops = causal_fwd_flops(1, 28, L, 128)
            row = {"dtype": str(dtype).replace("torch.", ""), "L": L, "gflops": {}, "seconds": {}, "errors": {}}
            for m in methods:
                try:
                    fn = build(m, L, dtype)
                    sec = time_fn(fn, repeat, warmup=2 if m == "flex" else 1)
                    row["seconds"][m] = sec
                    row["gflops"][m] = flops / sec / 1e9
                except Exception as e:  # a baseline that cannot run here is reported, not hidden
                    row["errors"][m] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"{row['dtype']:>8} L={L:5d} {m:12s} "
                      + (f"{row['gflops'][m]:7.1f} GFLOP/s" if m in row["gflops"] else row["errors"][m]),
                      flush=True)
            ours = row["gflops"].get("avar")
            row["ratio"] = {m: ours / g for m, g in row["gflops"].items() if m != "avar" and ours}
            rows.append(row)

    memory = []
    for L in memory_lengths:
        entry = {"L": L, "peak_mb": {}}
        for m in ("avar", "sdpa_mask", "eager"):
            est_gb = 28 * L * L * 4 * 3 / 1e9  # maps (and the mask) for the materialising baselines
            if m != "avar" and est_gb > 12:
                entry["peak_mb"][m] = None
                continue
            entry["peak_mb"][m] = peak_rss_mb_of(f"from bench_attention import build\nfn = build({m!r}, {L}, torch.float32)\nfn()",
                                                 env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
        memory.append(entry)
        print(f"memory L={L}: " + ", ".join(f"{m} {v:.0f} MB" if v is not None else f"{m} skipped (>12 GB)"
                                           for m, v in entry["peak_mb"].items()), flush=True)
    return rows, memory


def markdown(info, rows, memory, command) -> str:
    lines = [
        "# CPU forward: avar fused attention vs PyTorch", "",
        f"Machine: {info['cpu']}, {info['threads']} threads; torch {info['torch']} "
        f"({info['torch_cpu_capability']}), avar {info['avar']} ({info['avar_cpu_isa']}), "
        f"Python {info['python']}; {info['date']}.", "",
        f"Command: `{command}`", "",
        "Qwen2.5-VL-7B text layer: B = 1, H = 28, H_kv = 4, D = 128, causal. Useful GFLOP/s "
        "(4·H·L²·D / 2 per call). avar computes the per-(head, group) bias and returns the 4 group masses; "
        "SDPA is_causal has no bias (PyTorch's CPU flash kernel, the ceiling); the other baselines apply the "
        "same bias (eager also returns masses).", "",
        "| dtype | L | " + " | ".join(LABELS[m] for m in METHODS) + " | avar / SDPA causal | avar / SDPA+mask "
        "| avar / Flex | avar / eager |",
        "|---|---:|" + "---:|" * (len(METHODS) + 4),
    ]
    for r in rows:
        cells = [f"{r['gflops'][m]:.1f}" if m in r["gflops"] else "n/a" for m in METHODS]
        ratios = [f"{r['ratio'][m]:.2f}×" if m in r["ratio"] else "n/a"
                  for m in ("sdpa_causal", "sdpa_mask", "flex", "eager")]
        lines.append(f"| {r['dtype']} | {r['L']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    errors = [(r["dtype"], r["L"], m, e) for r in rows for m, e in r["errors"].items()]
    if errors:
        lines += ["", "Baselines that could not run:", ""]
        lines += [f"- {d} L={L} {LABELS[m]}: {e}" for d, L, m, e in errors]
    if memory:
        lines += ["", "Peak resident memory of one fp32 call, inputs (and the mask a baseline needs) included (MB, fresh process):", "",
                  "| L | avar | SDPA + mask | eager with maps |", "|---:|---:|---:|---:|"]
        for e in memory:
            cells = [f"{e['peak_mb'][m]:.0f}" if e["peak_mb"][m] is not None else "skipped (> 12 GB)"
                     for m in ("avar", "sdpa_mask", "eager")]
            lines.append(f"| {e['L']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no report: checks that everything runs")
    ap.add_argument("--name", default="cpu_attention", help="report file name under benchmarks/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeat, args.memory_lengths = [256], 1, [256]
    dtypes = [getattr(torch, d) for d in args.dtypes]
    info = machine_info()
    rows, memory = run(args.lengths, dtypes, args.repeat, args.methods, args.memory_lengths)
    command = "OMP_NUM_THREADS={} python benchmarks/bench_attention.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(argv if argv is not None else sys.argv[1:]))
    md = markdown(info, rows, memory, command.strip())
    print(md)
    if not args.quick:
        write_report(args.name, {"machine": info, "command": command, "results": rows, "memory": memory}, md)


if __name__ == "__main__":
    main()
