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

import os
import sys

import torch
import torch.nn.functional as F

import avar_ops
from avar_ops.core import NUM_GROUPS
from common import (
    command_line,
    additive_mask, arg_parser, causal_bwd_flops, causal_fwd_flops, eager_with_maps, error_lines, machine_info,
    make_problem, measure_memory, memory_lines, parse_args, peak_rss_mb_of, publish, time_methods, to_bhld,
)

H, HKV, D, B = 28, 4, 128, 1
METHODS = ["avar", "sdpa_causal", "sdpa_mask", "eager"]
LABELS = {
    "avar": "avar (bias + masses, grads through out and mass)",
    "sdpa_causal": "SDPA is_causal, no bias",
    "sdpa_mask": "SDPA + additive mask",
    "eager": "eager with maps (out and masses)",
}
PHASES = ["bwd", "fwd_bwd"]


def build(method: str, L: int, dtype: torch.dtype):
    """forward() -> (outputs, upstream gradients): what backward differentiates, for one method."""
    q, k, v, kg, bias = make_problem(L, dtype, H=H, Hkv=HKV, D=D, B=B)
    gen = torch.Generator().manual_seed(1)
    if method == "avar":
        leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
        dout = torch.randn(q.shape, generator=gen).to(dtype)  # [B, L, H, D]
        dmass = torch.randn(B, H, L, NUM_GROUPS, generator=gen)  # [B, H, L, G]

        def forward():
            res = avar_ops.attention(leaves[0], leaves[1], leaves[2], kg, leaves[3], return_mass=True)
            return (res.out, res.mass), (dout, dmass)

        return forward
    # kv heads are expanded outside the timed region (so PyTorch's flash kernel takes them) and are the leaves
    qh, kh, vh = [t.requires_grad_(True) for t in to_bhld(q, k, v, H)]  # [B, H, L, D] each
    dout = torch.randn(B, H, L, D, generator=gen).to(dtype)  # [B, H, L, D]
    if method == "sdpa_causal":
        return lambda: ((F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),), (dout,))
    mask = additive_mask(kg, bias, L, dtype)  # [B, H, L, L], built once, outside the timed region
    if method == "sdpa_mask":
        return lambda: ((F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask),), (dout,))
    onehot = F.one_hot(kg.long().clamp(min=0), NUM_GROUPS).to(dtype)[:, None]  # [B, 1, L, G]
    dmass = torch.randn(B, H, L, NUM_GROUPS, generator=gen).to(dtype)  # [B, H, L, G]
    return lambda: (eager_with_maps(qh, kh, vh, mask, onehot), (dout, dmass))


def timed(method, phase, L, dtype):
    forward = build(method, L, dtype)
    if phase == "fwd_bwd":
        def step():
            outs, grads = forward()
            torch.autograd.backward(outs, grads)
        return step
    outs, grads = forward()
    return lambda: torch.autograd.backward(outs, grads, retain_graph=True)


def peak_rss_mb(method: str, L: int, threads: int) -> float:
    """Peak resident memory (MB) one fp32 forward + backward adds to its inputs, in a fresh interpreter."""
    setup = (f"torch.set_num_threads({threads})\n"
             "from bench_backward import timed\n"
             f"fn = timed({method!r}, 'fwd_bwd', {L}, torch.float32)")
    return peak_rss_mb_of("fn()", setup=setup)


def maps_gb(method: str, L: int) -> float:
    """What the materialising baselines hold: mask, scores, probabilities and their gradient (fp32)."""
    return H * L * L * 4 * 4 / 1e9 if method in ("sdpa_mask", "eager") else 0.0


def run(lengths, dtypes, repeat, methods, memory_lengths, threads):
    rows = []
    for dtype in dtypes:
        for L in lengths:
            for phase in PHASES:
                flops = causal_bwd_flops(B, H, L, D) + (causal_fwd_flops(B, H, L, D) if phase == "fwd_bwd" else 0)
                row = {"dtype": str(dtype).replace("torch.", ""), "L": L, "phase": phase, "gflops": {},
                       "seconds": {}, "errors": {}}
                rows.append(time_methods(row, methods, lambda m: timed(m, phase, L, dtype), flops, repeat,
                                         f"{row['dtype']:>8} L={L:5d} {phase:7s}", budget_s=90.0))
    memory = measure_memory(memory_lengths, METHODS, maps_gb, lambda m, L: peak_rss_mb(m, L, threads))
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
    lines += error_lines(rows, LABELS)
    lines += memory_lines(memory, METHODS,
                          "Peak resident memory added by one fp32 forward + backward (MB, fresh process):",
                          [LABELS[m] for m in METHODS])
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = arg_parser(__doc__, METHODS, "cpu_backward")
    ap.add_argument("--threads", type=int, default=2)
    args = parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    rows, memory = run(args.lengths, args.dtypes, args.repeat, args.methods, args.memory_lengths, args.threads)
    command = command_line("bench_backward.py", argv)
    publish(args, info, command, rows, memory, markdown(info, rows, memory, command))


if __name__ == "__main__":
    main()
