"""CPU backward benchmark: avar's fused attention (bias + masses) trained through, against PyTorch's paths.

Shapes are a Qwen2.5-VL-7B text layer (H = 28, H_kv = 4, D = 128, B = 1), causal. Two timings per method:
the backward alone (the forward's graph is kept and its backward rerun) and forward + backward. Gradients
flow into q, k, v (and avar's bias) from out and, for the methods that produce them, the group masses.
Useful-FLOP GFLOP/s as FlashAttention counts them (forward 4·B·H·L²·D / 2 causal, backward 2.5× that),
ratios against every baseline measured in the same run, and peak resident memory of one forward + backward
in a fresh process. Writes benchmarks/results/cpu_backward.{json,md}.

    OMP_NUM_THREADS=2 python benchmarks/bench_backward.py            # L = 512..4096, fp32 and bf16, 2 threads
    OMP_NUM_THREADS=2 python benchmarks/bench_backward.py --quick    # a smoke run, no report
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import avar_ops
from avar_ops.core import NUM_GROUPS

import harness
from problems import (
    DIM,
    HEADS,
    KV_HEADS,
    additive_mask,
    cpu_arg_parser,
    eager_with_maps,
    group_onehot,
    make_problem,
    parse_cpu_args,
    to_bhld,
)

H, HKV, D, B = HEADS, KV_HEADS, DIM, 1
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
    onehot = group_onehot(kg, dtype)  # [B, 1, L, G]
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


def maps_gb(method: str, L: int) -> float:
    """What the materialising baselines hold: mask, scores, probabilities and their gradient (fp32)."""
    return H * L * L * 4 * 4 / 1e9 if method in ("sdpa_mask", "eager") else 0.0


def run(lengths, dtypes, repeat, methods, memory_lengths, threads):
    rows = []
    shapes = [(d, L, p) for d in dtypes for L in lengths for p in PHASES]
    for dtype, L, phase in tqdm(shapes, desc="backward", unit="shape"):
        row = {"dtype": str(dtype).removeprefix("torch."), "L": L, "phase": phase}
        row["flops"] = harness.attention_flops(B, H, L, L, D, causal=True, phase=phase)
        tag = f"{row['dtype']:>8} L={L:5d} {phase:7s}"
        build_one = lambda m: timed(m, phase, L, dtype)  # noqa: E731, B023 (used before the loop moves on)
        rows.append(
            harness.time_methods(row, methods, build_one, repeat=repeat, budget_s=90.0, tag=tag, log=tqdm.write)
        )

    def code_of(m, L):  # one fp32 forward + backward; the inputs are built before the reset
        setup = (
            f"torch.set_num_threads({threads})\n"
            "from bench_backward import timed\n"
            f"fn = timed({m!r}, 'fwd_bwd', {L}, torch.float32)"
        )
        return setup, "fn()"

    memory = harness.peak_memory(memory_lengths, METHODS, code_of, maps_gb)
    return rows, memory


def markdown(env, rows, memory) -> str:
    baselines = [m for m in METHODS if m != "avar"]
    lines = ["# CPU backward: avar fused attention vs PyTorch", "", *harness.environment_lines(env), ""]
    lines += [
        "Qwen2.5-VL-7B text layer: B = 1, H = 28, H_kv = 4, D = 128, causal. Useful GFLOP/s (median of the "
        "repeats): forward 4·H·L²·D / 2, backward 2.5× that, forward + backward 3.5×. avar applies the per-(head, "
        "group) bias and back-propagates from out and the 4 group masses into q, k, v and the bias. SDPA is_causal "
        "has no bias (PyTorch's CPU flash kernel, the ceiling); SDPA + mask and eager apply the same bias as a float "
        "mask built outside the timed region (no gradient into it); eager also returns and back-propagates masses. "
        "SDPA and eager get kv heads expanded to H outside the timed region. Ratios: avar's speed over the "
        "baseline's, both measured in this run.",
        "",
    ]
    short = {m: LABELS[m].split(",")[0].split(" (")[0] for m in baselines}
    headers = ["dtype", "L", "phase"] + [LABELS[m] for m in METHODS] + [f"avar / {short[m]}" for m in baselines]
    table = [
        [r["dtype"], r["L"], r["phase"]]
        + [harness.fmt(r["gflops"].get(m), ".1f", "n/a") for m in METHODS]
        + [harness.fmt(r["speedup"].get(m), ".2f", "n/a") + ("×" if m in r["speedup"] else "") for m in baselines]
        for r in rows
    ]
    lines += harness.markdown_table(headers, table, "lrl" + "r" * (len(headers) - 3))
    errors = [f"- {r['dtype']} L={r['L']} {r['phase']} {LABELS[m]}: {e}" for r in rows for m, e in r["errors"].items()]
    if errors:
        lines += ["", "Baselines that could not run:", "", *errors]
    lines += harness.memory_lines(
        memory,
        METHODS,
        "Peak resident memory added by one fp32 forward + backward (MB, fresh process):",
        [LABELS[m] for m in METHODS],
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = cpu_arg_parser(__doc__, METHODS, "cpu_backward")
    ap.add_argument("--threads", type=int, default=2)
    args = parse_cpu_args(ap, argv)
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    env = harness.environment(argv)
    rows, memory = run(args.lengths, args.dtypes, args.repeat, args.methods, args.memory_lengths, args.threads)
    harness.finish(env)
    report = markdown(env, rows, memory)
    print(report)
    if not args.quick:
        payload = {"environment": env, "results": rows, "memory": memory}
        paths = harness.write_report(harness.RESULTS, args.name, payload, report)
        print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
