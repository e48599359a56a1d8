"""CPU decode step: one query token per sequence against a KV cache, next to the machine's read bandwidth.

A decode step is memory-bound: its floor is reading K and V once. Every cell times, in the same run,

    avar            the fused op with the intervention's bias and the group masses (what the patch runs)
    avar_plain      the fused op without bias, groups or masses
    avar_tiled      the same call as avar through the tiled prefill forward (AVAR_CPU_DECODE=0), the path
                    decode steps took before the decode kernel
    sdpa            torch SDPA with enable_gqa=True, no bias (the stock model's decode step)

on Qwen2.5-VL-7B text-layer shapes (H = 28, H_kv = 4, D = 128) with K and V laid out as Hugging Face's cache
holds them ([B, H_kv, L, D], handed over as a BSHD view). The K + V read rate of each method is set next to the
machine's own read bandwidth, measured in the same run as the time of a sum over a large tensor. With
--generate it also times the cached decode steps of `generate` on the Qwen2.5-VL-7B-shaped slice (2 decoder
layers, random weights), patched against stock SDPA, in tokens per second.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_decode.py [--generate]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F

import avar_ops
from avar_ops.core import NUM_GROUPS

import harness
from problems import DIM, GROUP_BIAS, HEADS, KV_HEADS, key_groups

METHODS = ("avar", "avar_plain", "avar_tiled", "sdpa")
BANDWIDTH_BYTES = 256 * 2**20  # large enough to leave every cache level behind


def read_bandwidth(repeat: int) -> dict:
    """Bytes per second of torch.sum over a 256 MB float32 tensor (all threads), median of `repeat` calls."""
    x = torch.ones(BANDWIDTH_BYTES // 4)  # [N]
    t = harness.measure(lambda: x.sum(), repeat=repeat, warmup=2)
    return {
        "bytes": BANDWIDTH_BYTES,
        "seconds": t.median,
        "samples": t.samples,
        "gb_per_s": BANDWIDTH_BYTES / t.median / 1e9,
    }


def decode_inputs(batch: int, cache: int, dtype, seed: int = 0):
    """q [B, 1, H, D], k and v as BSHD views of [B, H_kv, L, D] caches, key groups [B, L], bias [H, G]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, HEADS, DIM, generator=gen).to(dtype)  # [B, 1, H, D]
    k = torch.randn(batch, KV_HEADS, cache, DIM, generator=gen).to(dtype).transpose(1, 2)  # [B, L, Hkv, D]
    v = torch.randn(batch, KV_HEADS, cache, DIM, generator=gen).to(dtype).transpose(1, 2)  # [B, L, Hkv, D]
    bias = torch.tensor(GROUP_BIAS).expand(HEADS, NUM_GROUPS).contiguous()  # [H, G]
    return q, k, v, key_groups(batch, cache), bias


def read_in_turns(avar_fn, k, v, repeat: int) -> dict:
    """The time of plainly reading the same K and V (torch.sum of each cache, all threads) over avar's, the two
    timed in turns so that the machine's load falls on both: the median of the per-turn ratios is the share of the
    read rate these very bytes allow at that moment that avar reaches."""
    kc, vc = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, L, D]  the caches as allocated, contiguous

    def read():
        return kc.sum(), vc.sum()

    read(), avar_fn()
    reads, shares = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        read()
        t1 = time.perf_counter()
        avar_fn()
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        shares.append((t1 - t0) / (t2 - t1))
    return {"read_seconds": statistics.median(reads), "share": statistics.median(shares), "shares": shares}


def method_fn(method: str, q, k, v, kg, bias):
    if method == "sdpa":
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), L, D], as HF holds them
        return lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
    if method == "avar_plain":
        return lambda: avar_ops.attention(q, k, v)

    def fused():
        return avar_ops.attention(q, k, v, kg, bias, return_mass=True)

    if method == "avar":
        return fused

    def tiled():
        os.environ["AVAR_CPU_DECODE"] = "0"
        try:
            return fused()
        finally:
            del os.environ["AVAR_CPU_DECODE"]

    return tiled


def time_generate(new_tokens: int, prompt_len: int, repeat: int) -> dict:
    """Decode tokens per second of greedy `generate` on the 7B-shaped slice, stock SDPA and patched, in turns.

    Each round times generate() for 1 and for 1 + new_tokens tokens; the difference is the time of new_tokens
    cached decode steps (the prefill, the same in both calls, cancels)."""
    import sft_step

    from avar_ops.hf import apply_to_qwen2_5_vl

    model, processor = sft_step.build_slice(seed=0)
    tok = processor.tokenizer
    words = "Look at the image and think about the shapes, colours and their relations. "
    n_words = max(1, prompt_len // len(tok.encode(words)))
    messages = [{"role": "user", "content": [{"type": "text", "text": words * n_words}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = dict(processor(text=[text], return_tensors="pt"))

    def run(n: int) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)
            return time.perf_counter() - t0

    steps = {"sdpa": [], "avar": []}  # seconds of new_tokens decode steps, per round
    for i in range(repeat + 1):  # the first round warms both up
        for method in ("sdpa", "avar"):
            handle = apply_to_qwen2_5_vl(model, tokenizer=processor) if method == "avar" else None
            try:
                t = run(1 + new_tokens) - run(1)
            finally:
                if handle is not None:
                    handle.revert()
            if i > 0:
                steps[method].append(t)
    med = {m: statistics.median(s) for m, s in steps.items()}
    ratios = sorted(a / b for a, b in zip(steps["sdpa"], steps["avar"]))  # [rounds]  avar speed-up of each round
    return {
        "prompt_tokens": prompt["input_ids"].shape[1],
        "weight_bytes": sum(w.numel() * w.element_size() for w in model.parameters()),
        "new_tokens": new_tokens,
        "decode_seconds": steps,
        "tokens_per_s": {m: new_tokens / med[m] for m in med},
        "round_speedups": ratios,
        "median_round_speedup": statistics.median(ratios),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--caches", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=10.0, help="time budget per method and cell")
    ap.add_argument("--generate", action="store_true", help="also time generate() on the 7B-shaped slice")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--generate-rounds", type=int, default=5, help="timed generate rounds per method, in turns")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no report: checks that everything runs")
    ap.add_argument("--name", default="cpu_decode", help="report file name under benchmarks/results")
    args = ap.parse_args(argv)
    if any(x <= 0 for x in args.batches + args.caches) or min(args.repeat, args.new_tokens, args.generate_rounds) < 1:
        ap.error("--batches, --caches, --repeat, --new-tokens and --generate-rounds must be positive")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", args.name):
        ap.error(f"--name must be a plain file name (letters, digits, _ . -), got {args.name!r}")
    if args.quick:
        args.batches, args.caches, args.repeat, args.new_tokens, args.prompt_len = [1, 2], [300], 2, 2, 64

    env = harness.environment(argv)
    bandwidth = [read_bandwidth(args.repeat)]
    print(f"read bandwidth: {bandwidth[0]['gb_per_s']:.1f} GB/s")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in args.batches:
            for cache in args.caches:
                inputs = decode_inputs(batch, cache, dtype)
                kv_bytes = 2 * batch * cache * KV_HEADS * DIM * inputs[0].element_size()
                row = {"dtype": dtype_name, "batch": batch, "cache": cache, "kv_bytes": kv_bytes}
                row["flops"] = harness.attention_flops(batch, HEADS, 1, cache, DIM, causal=False, phase="fwd")
                harness.time_methods(
                    row,
                    args.methods,
                    lambda m, inputs=inputs: method_fn(m, *inputs),
                    repeat=args.repeat,
                    budget_s=args.budget_s,
                    tag=f"{dtype_name} B={batch} L={cache}",
                )
                row["read_gb_per_s"] = {m: kv_bytes / t / 1e9 for m, t in row["seconds"].items()}
                if "avar" in args.methods:
                    row["kv_read"] = read_in_turns(method_fn("avar", *inputs), inputs[1], inputs[2], args.repeat)
                    row["kv_read"]["gb_per_s"] = kv_bytes / row["kv_read"]["read_seconds"] / 1e9
                rows.append(row)
    bandwidth.append(read_bandwidth(args.repeat))  # the load may have changed during the run
    rounds = 1 if args.quick else args.generate_rounds
    generate = time_generate(args.new_tokens, args.prompt_len, rounds) if args.generate else None
    harness.finish(env)

    bw = sorted(b["gb_per_s"] for b in bandwidth)
    report = markdown(env, rows, bw, generate, args.methods)
    print(report)
    if args.quick:
        return
    payload = {
        "environment": env,
        "high_load": harness.high_load(env),
        "bandwidth": bandwidth,
        "results": rows,
        "generate": generate,
    }
    paths = harness.write_report(harness.RESULTS, args.name, payload, report)
    print("wrote " + " and ".join(paths))


def markdown(env, rows, bw, generate, methods) -> str:
    lines = [
        f"# CPU decode step: 1 query token, H = {HEADS}, H_kv = {KV_HEADS}, D = {DIM}, cache as HF holds it",
        "",
        *harness.environment_lines(env),
        f"- Read bandwidth (torch.sum over 256 MB, all threads), at the start and the end of the run: "
        f"{bw[0]:.1f} and {bw[-1]:.1f} GB/s (sorted); `of bandwidth` compares avar's K + V read rate with "
        "the higher one",
        "- `K+V sum GB/s`: torch.sum over the cell's own K and V caches (all threads), timed in turns with the avar "
        "call; `of K+V sum`: the median over those turns of the sum's time over avar's (the load of the moment "
        "falls on both)",
        *harness.high_load_lines(env),
        "",
        "Medians of perf_counter-timed calls. avar: bias and masses; avar_plain: neither; avar_tiled: the avar "
        "call through the tiled prefill forward (the path decode took before); sdpa: enable_gqa=True, no bias. "
        "Ratios over avar (> 1: avar is faster).",
        "",
    ]
    headers = ["dtype", "B", "cache"] + [f"{m} ms" for m in methods]
    headers += [f"{m} / avar" for m in methods if m != "avar"]
    headers += ["avar K+V GB/s", "of bandwidth", "K+V sum GB/s", "of K+V sum"]
    table = []
    for r in rows:
        sec, sp = r["seconds"], r["speedup"]
        line = [r["dtype"], r["batch"], r["cache"]]
        line += [harness.fmt(None if sec.get(m) is None else sec[m] * 1e3, ".2f", "error") for m in methods]
        line += [harness.fmt(sp.get(m), ".2f") for m in methods if m != "avar"]
        rate = r["read_gb_per_s"].get("avar")
        line += [harness.fmt(rate, ".1f"), harness.fmt(None if rate is None else rate / bw[-1], ".0%")]
        kv = r.get("kv_read")
        line += [harness.fmt(None if kv is None else kv["gb_per_s"], ".1f")]
        line += [harness.fmt(None if kv is None else kv["share"], ".0%")]
        table.append(line)
    lines += harness.markdown_table(headers, table, align="lrr" + "r" * (len(headers) - 3))
    errors = [(r["dtype"], r["batch"], r["cache"], m, e) for r in rows for m, e in r["errors"].items()]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {d} B={b} L={c} {m}: {e}" for d, b, c, m, e in errors]
    if generate is not None:
        tps, ratios = generate["tokens_per_s"], generate["round_speedups"]
        cache_tokens = generate["prompt_tokens"] + generate["new_tokens"]
        cache_mb = cache_tokens * 2 * 2 * KV_HEADS * DIM * 4 / 1e6  # 2 layers, K and V, fp32
        lines += [
            "",
            f"`generate` on the 7B-shaped slice (2 decoder layers, fp32, greedy, batch 1, "
            f"{generate['prompt_tokens']}-token prompt): {generate['new_tokens']} cached decode steps (the time "
            f"of generating 1 + {generate['new_tokens']} tokens minus that of 1, median of "
            f"{len(generate['decode_seconds']['avar'])} rounds in turns): stock SDPA {tps['sdpa']:.1f} tokens/s, "
            f"patched avar {tps['avar']:.1f} tokens/s; avar's speed-up within a round: median "
            f"{generate['median_round_speedup']:.2f}×, range {ratios[0]:.2f}–{ratios[-1]:.2f}×. A step of this slice "
            f"reads all {generate['weight_bytes'] / 1e9:.2f} GB of its weights and at most {cache_mb:.0f} MB of KV "
            "cache, so the attention kernel moves these figures little and the machine's noise shows in the range.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
