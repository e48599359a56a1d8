"""CPU forward benchmark: avar's fused attention (bias + masses) against PyTorch's attention paths.

Shapes are a Qwen2.5-VL-7B text layer (H = 28, H_kv = 4, D = 128, B = 1), causal. Prints useful-FLOP
GFLOP/s (causal counts half), ratios against every baseline measured in the same run, and peak memory;
writes benchmarks/results/cpu_attention.{json,md}.

    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py            # L = 512..4096, fp32 and bf16
    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py --quick    # a smoke run
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import avar_ops
from common import (
    command_line,
    additive_mask, arg_parser, causal_fwd_flops, eager_with_maps, error_lines, flex_callable, machine_info,
    make_problem, measure_memory, memory_lines, parse_args, peak_rss_mb_of, publish, time_methods, to_bhld,
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
            row = {"dtype": str(dtype).replace("torch.", ""), "L": L, "gflops": {}, "seconds": {}, "errors": {}}
            rows.append(time_methods(row, methods, lambda m: build(m, L, dtype), causal_fwd_flops(1, 28, L, 128),
                                     repeat, f"{row['dtype']:>8} L={L:5d}", warmup={"flex": 2}))

    def needs_gb(m, L):  # maps (and the mask) for the materialising baselines
        return 0.0 if m == "avar" else 28 * L * L * 4 * 3 / 1e9

    def peak_mb(m, L):
        return peak_rss_mb_of(f"from bench_attention import build\nfn = build({m!r}, {L}, torch.float32)\nfn()",
                              env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})

    memory = measure_memory(memory_lengths, ("avar", "sdpa_mask", "eager"), needs_gb, peak_mb)
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
    lines += error_lines(rows, LABELS)
    lines += memory_lines(memory, ("avar", "sdpa_mask", "eager"), "Peak resident memory of one fp32 call, inputs "
                          "(and the mask a baseline needs) included (MB, fresh process):",
                          ["avar", "SDPA + mask", "eager with maps"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(arg_parser(__doc__, METHODS, "cpu_attention"), argv)
    info = machine_info()
    rows, memory = run(args.lengths, args.dtypes, args.repeat, args.methods, args.memory_lengths)
    command = command_line("bench_attention.py", argv)
    publish(args, info, command, rows, memory, markdown(info, rows, memory, command))


if __name__ == "__main__":
    main()
