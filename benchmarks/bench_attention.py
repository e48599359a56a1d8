"""CPU forward benchmark: avar's fused attention (bias + masses) against PyTorch's attention paths.

Shapes are a Qwen2.5-VL-7B text layer (H = 28, H_kv = 4, D = 128, B = 1), causal. Prints useful-FLOP
GFLOP/s (causal counts half), ratios against every baseline measured in the same run, and peak memory;
writes benchmarks/results/cpu_attention.{json,md}.

    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py            # L = 512..4096, fp32 and bf16
    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py --quick    # a smoke run
"""

from __future__ import annotations

import torch.nn.functional as F
from tqdm import tqdm

import avar_ops

import harness
from problems import (
    DIM,
    HEADS,
    additive_mask,
    cpu_arg_parser,
    eager_with_maps,
    flex_callable,
    group_onehot,
    make_problem,
    parse_cpu_args,
    to_bhld,
)

METHODS = ["avar", "sdpa_causal", "sdpa_mask", "flex", "eager"]
LABELS = {
    "avar": "avar (bias + masses)",
    "sdpa_causal": "SDPA is_causal, no bias",
    "sdpa_mask": "SDPA + additive mask",
    "flex": "FlexAttention score_mod",
    "eager": "eager with maps",
}
MEMORY_METHODS = ("avar", "sdpa_mask", "eager")


def build(method, L, dtype, H=HEADS):
    q, k, v, kg, bias = make_problem(L, dtype, H=H)
    if method == "avar":
        return lambda: avar_ops.attention(q, k, v, kg, bias, return_mass=True)
    qh, kh, vh = to_bhld(q, k, v, H)
    if method == "sdpa_causal":
        return lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    mask = additive_mask(kg, bias, L, dtype)  # [B, H, L, L]
    if method == "sdpa_mask":
        return lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    if method == "flex":
        fn = flex_callable(kg, bias)
        return lambda: fn(qh, kh, vh)
    onehot = group_onehot(kg, dtype)  # [B, 1, L, G]
    return lambda: eager_with_maps(qh, kh, vh, mask, onehot)


def run(lengths, dtypes, repeat, methods, memory_lengths):
    rows = []
    for dtype, L in tqdm([(d, L) for d in dtypes for L in lengths], desc="forward", unit="shape"):
        row = {"dtype": str(dtype).removeprefix("torch."), "L": L}
        row["flops"] = harness.attention_flops(1, HEADS, L, L, DIM, causal=True, phase="fwd")
        tag = f"{row['dtype']:>8} L={L:5d}"
        build_one = lambda m: build(m, L, dtype)  # noqa: E731, B023 (used before the loop moves on)
        rows.append(
            harness.time_methods(row, methods, build_one, repeat=repeat, warmup={"flex": 2}, tag=tag, log=tqdm.write)
        )

    def code_of(m, L):  # inputs (and the mask a baseline needs) count: they are built after the reset
        return "from bench_attention import build", f"fn = build({m!r}, {L}, torch.float32)\nfn()"

    def needs_gb(m, L):  # the materialising baselines hold the mask and the maps (fp32)
        return 0.0 if m == "avar" else HEADS * L * L * 4 * 3 / 1e9

    memory = harness.peak_memory(memory_lengths, MEMORY_METHODS, code_of, needs_gb)
    return rows, memory


def markdown(env, rows, memory) -> str:
    baselines = [m for m in METHODS if m != "avar"]
    lines = ["# CPU forward: avar fused attention vs PyTorch", "", *harness.environment_lines(env), ""]
    lines += [
        "Qwen2.5-VL-7B text layer: B = 1, H = 28, H_kv = 4, D = 128, causal. Useful GFLOP/s (4·H·L²·D / 2 per "
        "call, median of the repeats). avar computes the per-(head, group) bias and returns the 4 group masses; "
        "SDPA is_causal has no bias (PyTorch's CPU flash kernel, the ceiling); the other baselines apply the same "
        "bias (eager also returns masses). Ratios: avar's speed over the baseline's, both measured in this run.",
        "",
    ]
    table = [
        [r["dtype"], r["L"]]
        + [harness.fmt(r["gflops"].get(m), ".1f", "n/a") for m in METHODS]
        + [harness.fmt(r["speedup"].get(m), ".2f", "n/a") + ("×" if m in r["speedup"] else "") for m in baselines]
        for r in rows
    ]
    headers = ["dtype", "L"] + [LABELS[m] for m in METHODS] + [f"avar / {LABELS[m]}" for m in baselines]
    lines += harness.markdown_table(headers, table)
    errors = [f"- {r['dtype']} L={r['L']} {LABELS[m]}: {e}" for r in rows for m, e in r["errors"].items()]
    if errors:
        lines += ["", "Baselines that could not run:", "", *errors]
    lines += harness.memory_lines(
        memory,
        MEMORY_METHODS,
        "Peak resident memory of one fp32 call, inputs (and the mask a baseline needs) included (MB, fresh process):",
        ["avar", "SDPA + mask", "eager with maps"],
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_cpu_args(cpu_arg_parser(__doc__, METHODS, "cpu_attention"), argv)
    env = harness.environment(argv)
    rows, memory = run(args.lengths, args.dtypes, args.repeat, args.methods, args.memory_lengths)
    harness.finish(env)
    report = markdown(env, rows, memory)
    print(report)
    if not args.quick:
        payload = {"environment": env, "results": rows, "memory": memory}
        paths = harness.write_report(harness.RESULTS, args.name, payload, report)
        print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
