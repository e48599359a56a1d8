"""GPU kernel benchmark: avar attention (with and without masses) against SDPA flash (no bias, the speed
ceiling), SDPA with the equivalent additive mask, FlexAttention with the equivalent score_mod and a causal
BlockMask, and eager attention maps. Forward, backward and decode; bf16, D = 128, H = 28, H_kv = 4 (Qwen2.5-VL-7B
text), L = 1k…16k with B·L = 16k.

FLOPs as FlashAttention counts them: forward 4·B·H·Lq·Lk·D (halved when causal), backward 2.5× forward.
Every measurement is time-boxed against one overall budget; what does not fit is skipped with a note.

    python benchmarks/bench_gpu.py --out OUTDIR [--budget-s 300] [--checks checks.json] [--no-tiles]
    python benchmarks/bench_gpu.py --out OUTDIR --dry-run     # no GPU: plan and report skeleton only

Tile shapes (on by default, --no-tiles skips them): the forward and backward with masses under each tile shape of
the CUDA kernels (8 warps × 16 query rows with 64-key backward blocks; 4 warps × 32 rows with 128-key backward
blocks where they fit), and decode with the query heads of a GQA group packed into one tile and without, all in
the same run; the report says which wins per shape on this GPU's arch, which decides the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from avar_ops import NUM_GROUPS
from avar_ops.core import load_extension

import harness
from problems import GROUP_BIAS, key_groups


@dataclasses.dataclass
class Config:
    lengths: list
    tokens: int
    heads: int
    kv_heads: int
    dim: int
    decode_q: int
    budget_s: float
    max_reps: int
    measure_s: float
    tiles: bool = True


@dataclasses.dataclass
class Result:
    direction: str  # fwd | bwd | decode
    method: str
    batch: int
    len_q: int
    len_k: int
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None  # decode: K/V bytes read per second
    peak_mib: float | None = None  # torch.cuda.max_memory_allocated during the measurement
    extra_mib: float | None = None  # peak minus what was allocated before (inputs)
    note: str = ""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_report.md and gpu_report.json")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="sequence lengths, comma separated")
    ap.add_argument("--tokens", type=int, default=16384, help="B·L: the batch is tokens // L")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--decode-q", type=int, default=1, help="query rows per sequence in the decode benchmark")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for all measurements")
    ap.add_argument("--measure-s", type=float, default=1.5, help="timed seconds per measurement (at most)")
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--checks", default=None, help="JSON file with the build/test/sanitizer results to include")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: write the plan and an empty report")
    ap.add_argument(
        "--tiles",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time both tile shapes and packed / unpacked decode in this run (default: on)",
    )
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or any(L <= 0 for L in lengths):
        ap.error(f"--lengths must be positive integers, got {args.lengths!r}")
    if any(args.tokens % L for L in lengths):
        ap.error(f"--tokens ({args.tokens}) must be a multiple of every length in {lengths}")
    if args.heads % args.kv_heads:
        ap.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.dim not in (64, 80, 128):
        ap.error(f"--dim must be 64, 80 or 128, got {args.dim}")
    cfg = Config(
        lengths,
        args.tokens,
        args.heads,
        args.kv_heads,
        args.dim,
        args.decode_q,
        args.budget_s,
        args.max_reps,
        args.measure_s,
        args.tiles,
    )
    return args, cfg


SHORT_BWD_LEN = 1025

# Methods that run avar (with masses) under one setting of the CUDA kernels: (setter on the extension, value).
TILE_SHAPES = ("8x16", "4x32")
SETTING_METHODS = {
    **{f"avar_{shape}": ("set_cuda_tile", shape) for shape in TILE_SHAPES},
    "avar_packed": ("set_cuda_gqa_packing", "on"),
    "avar_unpacked": ("set_cuda_gqa_packing", "off"),
}


def plan(cfg: Config):
    """(direction, method, batch, len_q, len_k) in priority order: the target comparisons first."""
    rows = []
    for direction in ("fwd", "bwd"):
        for L in cfg.lengths:
            for method in ("avar_mass", "avar", "sdpa_flash"):
                rows.append((direction, method, cfg.tokens // L, L, L))
    # One short sequence: the backward grid alone (key blocks × kv heads) leaves most SMs idle, so the backward
    # splits each key block's steps over several CTAs; "avar_nosplit" is the same op with the split turned off.
    for method in ("avar", "avar_nosplit", "sdpa_flash"):
        rows.append(("bwd", method, 1, SHORT_BWD_LEN, SHORT_BWD_LEN))
    for L in cfg.lengths:
        for method in ("avar_mass", "avar", "sdpa_flash"):
            rows.append(("decode", method, cfg.tokens // L, cfg.decode_q, L))
    if cfg.tiles:
        for direction in ("fwd", "bwd"):
            for L in cfg.lengths:
                for shape in TILE_SHAPES:
                    rows.append((direction, f"avar_{shape}", cfg.tokens // L, L, L))
        for L in cfg.lengths:
            for method in ("avar_packed", "avar_unpacked"):
                rows.append(("decode", method, cfg.tokens // L, cfg.decode_q, L))
            # One sequence: the grid is smallest there, so the split-KV heuristic matters most.
            for method in ("avar_packed", "avar_unpacked"):
                rows.append(("decode", method, 1, cfg.decode_q, L))
    for method in ("flex", "sdpa_mask", "eager"):
        for direction in ("fwd", "bwd"):
            for L in cfg.lengths:
                rows.append((direction, method, cfg.tokens // L, L, L))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Problem setup and the methods.


class Problem:
    def __init__(self, cfg: Config, batch: int, len_q: int, len_k: int, grad: bool):
        dev, dt = "cuda", torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(0)
        H, Hkv, D = cfg.heads, cfg.kv_heads, cfg.dim
        self.batch, self.len_q, self.len_k, self.heads, self.kv_heads, self.dim = batch, len_q, len_k, H, Hkv, D
        self.causal = True
        self.q = torch.randn(batch, len_q, H, D, device=dev, dtype=dt, generator=gen).requires_grad_(grad)
        self.k = torch.randn(batch, len_k, Hkv, D, device=dev, dtype=dt, generator=gen).requires_grad_(grad)
        self.v = torch.randn(batch, len_k, Hkv, D, device=dev, dtype=dt, generator=gen).requires_grad_(grad)
        # The prompt's groups, with the last keys masked as padding would be.
        g = key_groups(batch, len_k, device=dev)  # [B, Lk]
        g[:, -max(1, len_k // 64) :] = -1
        self.key_group = g
        self.bias = torch.tensor(GROUP_BIAS, device=dev, dtype=torch.float32)  # [G]
        self.d_out = torch.randn(batch, len_q, H, D, device=dev, dtype=dt, generator=gen)
        self.d_mass = torch.randn(batch, H, len_q, NUM_GROUPS, device=dev, generator=gen)

    def additive_mask(self):
        """[B, 1, Lq, Lk] bf16: group bias, −inf for masked and causally hidden keys (the SDPA/eager baseline)."""
        g = self.key_group.long()
        table = self.bias[g.clamp(min=0)]  # [B, Lk]
        table = table.masked_fill(g < 0, float("-inf"))
        i = torch.arange(self.len_q, device="cuda")[:, None]
        j = torch.arange(self.len_k, device="cuda")[None, :]
        hidden = j > i + (self.len_k - self.len_q)
        mask = table[:, None, None, :].expand(self.batch, 1, self.len_q, self.len_k)
        return mask.masked_fill(hidden, float("-inf")).to(torch.bfloat16).contiguous()


def method_fn(method: str, pb: Problem, direction: str, notes: list) -> Callable[[], object]:
    """A zero-argument callable that runs one forward (fwd/decode) or one backward (bwd) of `method`."""
    import torch.nn.functional as F

    def with_backward(forward, grads_of):
        outs = forward()
        tensors, grads = grads_of(outs)
        inputs = (pb.q, pb.k, pb.v)
        return lambda: torch.autograd.grad(tensors, inputs, grads, retain_graph=True)

    if method in SETTING_METHODS:
        setter_name, value = SETTING_METHODS[method]
        setter = getattr(load_extension(), setter_name)

        def under_setting(fn):
            setter(value)
            try:
                return fn()
            finally:
                setter("auto")

        inner = under_setting(lambda: method_fn("avar_mass", pb, direction, notes))
        return lambda: under_setting(inner)

    if method in ("avar", "avar_mass", "avar_nosplit"):
        import avar_ops

        mass = method == "avar_mass"

        def fwd():
            return avar_ops.attention(pb.q, pb.k, pb.v, pb.key_group, pb.bias, causal=True, return_mass=mass)

        if direction != "bwd":
            return fwd
        if mass:
            return with_backward(fwd, lambda o: ((o.out, o.mass), (pb.d_out, pb.d_mass)))
        bwd = with_backward(fwd, lambda o: ((o.out,), (pb.d_out,)))
        if method != "avar_nosplit":
            return bwd
        ext = load_extension()

        def bwd_without_split():
            ext.set_cuda_backward_splits(1)
            try:
                return bwd()
            finally:
                ext.set_cuda_backward_splits(0)

        return bwd_without_split

    qh, kh, vh = pb.q.transpose(1, 2), pb.k.transpose(1, 2), pb.v.transpose(1, 2)  # [B, H(kv), L, D]
    d_out_h = pb.d_out.transpose(1, 2)
    rep = pb.heads // pb.kv_heads
    causal_flag = pb.len_q == pb.len_k  # SDPA's is_causal is top-left aligned; with Lq = 1 every key is visible

    if method == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal_flag, enable_gqa=True)

        return fwd if direction != "bwd" else with_backward(fwd, lambda o: ((o,), (d_out_h,)))

    if method == "sdpa_mask":
        mask = pb.additive_mask()  # [B, 1, Lq, Lk]
        # The memory-efficient backend takes an additive mask but not GQA: K/V are expanded once, outside the timing.
        ke = kh.repeat_interleave(rep, dim=1)
        ve = vh.repeat_interleave(rep, dim=1)
        notes.append("sdpa_mask: K/V expanded to H heads outside the timed region (mask backends lack GQA)")

        def fwd():
            return F.scaled_dot_product_attention(qh, ke, ve, attn_mask=mask)

        return fwd if direction != "bwd" else with_backward(fwd, lambda o: ((o,), (d_out_h,)))

    if method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        groups = pb.key_group.long()  # [B, Lk]
        table = pb.bias  # [G]
        offset = pb.len_k - pb.len_q

        def score_mod(score, b, h, q_idx, kv_idx):
            g = groups[b, kv_idx]
            return torch.where(g >= 0, score + table[g.clamp(min=0)], -float("inf"))

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(causal, None, None, pb.len_q, pb.len_k, device="cuda")

        def fwd():
            return compiled(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)

        return fwd if direction != "bwd" else with_backward(fwd, lambda o: ((o,), (d_out_h,)))

    if method == "eager":
        mask = pb.additive_mask()  # [B, 1, Lq, Lk]
        scale = pb.dim**-0.5

        def fwd():
            ke = kh.repeat_interleave(rep, dim=1)
            ve = vh.repeat_interleave(rep, dim=1)
            s = (qh @ ke.transpose(-1, -2)) * scale + mask  # [B, H, Lq, Lk]
            p = torch.softmax(s.float(), dim=-1).to(qh.dtype)  # the maps, as HF eager keeps them
            return p @ ve

        return fwd if direction != "bwd" else with_backward(fwd, lambda o: ((o,), (d_out_h,)))

    raise ValueError(f"unknown method {method!r}")


def eager_fits(pb_shape, free_bytes):
    batch, heads, len_q, len_k = pb_shape
    maps = batch * heads * len_q * len_k
    # scores (bf16), fp32 softmax, bf16 maps, and about as much again in the backward
    return maps * (2 + 4 + 2) * 2 < 0.8 * free_bytes


def run_one(cfg: Config, row, notes: list) -> Result:
    direction, method, batch, len_q, len_k = row
    res = Result(direction, method, batch, len_q, len_k)
    if method == "eager":
        free, _ = torch.cuda.mem_get_info()
        if not eager_fits((batch, cfg.heads, len_q, len_k), free):
            res.note = "skipped: the attention maps do not fit in GPU memory"
            return res
    pb = None
    try:
        pb = Problem(cfg, batch, len_q, len_k, grad=direction == "bwd")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn = method_fn(method, pb, direction, notes)
        timing = harness.measure(fn, device="cuda", repeat=cfg.max_reps, budget_s=cfg.measure_s, min_repeat=3)
        res.ms = timing.median * 1e3
        peak = torch.cuda.max_memory_allocated()
        res.peak_mib = peak / 2**20
        res.extra_mib = (peak - base) / 2**20
        # Decode rows see (almost) every key of the cache: counted as non-causal.
        phase = "bwd" if direction == "bwd" else "fwd"
        flops = harness.attention_flops(
            batch, cfg.heads, len_q, len_k, cfg.dim, causal=direction != "decode", phase=phase
        )
        res.tflops = flops / (res.ms * 1e-3) / 1e12
        if direction == "decode":
            kv_bytes = 2 * batch * len_k * cfg.kv_heads * cfg.dim * 2
            res.gbps = kv_bytes / (res.ms * 1e-3) / 1e9
    except torch.cuda.OutOfMemoryError:
        res.note = "out of GPU memory"
    except Exception as e:  # a baseline that this torch cannot run is reported, not fatal
        res.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        del pb
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------------------
# Report.


BASELINES = ("sdpa_flash", "flex", "sdpa_mask", "eager")


def ratios(results):
    """Speedups of avar (with and without masses) over each baseline of the same direction and shape (baseline
    time / ours), and the cost of the masses."""
    ms = {}
    for r in results:
        ms.setdefault((r.direction, r.batch, r.len_q, r.len_k), {})[r.method] = r.ms
    out = []
    for r in results:
        if r.method not in ("avar", "avar_mass") or r.ms is None:
            continue
        shape = ms[(r.direction, r.batch, r.len_q, r.len_k)]
        speedup = harness.speedups(shape, r.method, BASELINES)
        entry = {"direction": r.direction, "method": r.method, "len_q": r.len_q, "len_k": r.len_k}
        entry.update({f"vs_{b}": round(speedup[b], 3) if b in speedup else None for b in BASELINES})
        if r.method == "avar_mass":
            plain = shape.get("avar")
            entry["mass_overhead"] = round(r.ms / plain - 1, 4) if plain else None
        if r.method == "avar" and shape.get("avar_nosplit"):
            entry["split_speedup"] = round(shape["avar_nosplit"] / r.ms, 3)
        out.append(entry)
    return out


def tile_winners(results):
    """Per (direction, B, Lq, Lk): the time of each tile shape (or packed / unpacked decode) and which wins."""
    groups = {}
    for r in results:
        if r.method in SETTING_METHODS and r.ms is not None:
            kind = "decode packing" if r.method in ("avar_packed", "avar_unpacked") else "tile shape"
            groups.setdefault((kind, r.direction, r.batch, r.len_q, r.len_k), {})[r.method] = r.ms
    out = []
    for (kind, direction, batch, len_q, len_k), ms in groups.items():
        if len(ms) < 2:
            continue
        (best, t_best), (other, t_other) = sorted(ms.items(), key=lambda kv: kv[1])[:2]
        out.append(
            {
                "kind": kind,
                "direction": direction,
                "batch": batch,
                "len_q": len_q,
                "len_k": len_k,
                "ms": {k: round(v, 4) for k, v in ms.items()},
                "winner": best.removeprefix("avar_"),
                "speedup_over_other": round(t_other / t_best, 3),
            }
        )
    return out


def device_arch() -> str:
    if not torch.cuda.is_available():
        return "no GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def write_report(out_dir, cfg, results, notes, checks, env):
    speedups = ratios(results)
    winners = tile_winners(results)
    report = {
        "environment": env,
        "config": dataclasses.asdict(cfg),
        "checks": checks,
        "results": [dataclasses.asdict(r) for r in results],
        "speedups": speedups,
        "arch": device_arch(),
        "tile_winners": winners,
        "notes": sorted(set(notes)),
    }
    fmt = harness.fmt
    lines = ["# avar GPU check", "", *harness.environment_lines(env)]
    lines += [
        f"- Shapes: bf16, D = {cfg.dim}, H = {cfg.heads}, H_kv = {cfg.kv_heads}, causal, B·L = {cfg.tokens}; "
        "FLOPs: fwd 4·B·H·Lq·Lk·D (halved when causal), bwd 2.5× fwd; times are medians of the repeats",
        "",
    ]
    if checks:
        lines += ["## Checks", "", *(f"- {name}: {value}" for name, value in checks.items()), ""]
    for direction, title in (("fwd", "Forward"), ("bwd", "Backward"), ("decode", "Decode")):
        rows = [r for r in results if r.direction == direction]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        if direction == "decode":
            headers = ["method", "B", "Lq", "Lk", "ms", "TFLOP/s", "K/V GB/s", "peak MiB", "extra MiB", "note"]
            cells = [
                [
                    r.method,
                    r.batch,
                    r.len_q,
                    r.len_k,
                    fmt(r.ms, ".3f"),
                    fmt(r.tflops, ".2f"),
                    fmt(r.gbps, ".0f"),
                    fmt(r.peak_mib, ".0f"),
                    fmt(r.extra_mib, ".0f"),
                    r.note,
                ]
                for r in rows
            ]
        else:
            headers = ["method", "B", "L", "ms", "TFLOP/s", "peak MiB", "extra MiB", "note"]
            cells = [
                [
                    r.method,
                    r.batch,
                    r.len_q,
                    fmt(r.ms, ".3f"),
                    fmt(r.tflops, ".1f"),
                    fmt(r.peak_mib, ".0f"),
                    fmt(r.extra_mib, ".0f"),
                    r.note,
                ]
                for r in rows
            ]
        lines += [*harness.markdown_table(headers, cells, "l" + "r" * (len(headers) - 2) + "l"), ""]
    if speedups:
        lines += ["## Speedups (baseline time / ours; > 1 means ours is faster)", ""]
        headers = [
            "direction",
            "ours",
            "L (Lq/Lk)",
            "vs SDPA flash",
            "vs Flex",
            "vs SDPA+mask",
            "vs eager",
            "mass overhead",
            "split speedup",
        ]
        cells = [
            [e["direction"], e["method"], f"{e['len_q']}/{e['len_k']}"]
            + [fmt(e[f"vs_{b}"], ".2f") for b in ("sdpa_flash", "flex", "sdpa_mask", "eager")]
            + [fmt(e.get("mass_overhead"), "+.1%"), fmt(e.get("split_speedup"), ".2f")]
            for e in speedups
        ]
        lines += [*harness.markdown_table(headers, cells, "lll" + "r" * 6), ""]
    if winners:
        lines += [f"## Tile shapes and decode packing on {device_arch()} (winner: faster of the two, same run)", ""]
        headers = ["what", "direction", "B", "Lq", "Lk", "ms", "winner", "speedup"]
        cells = [
            [
                w["kind"],
                w["direction"],
                w["batch"],
                w["len_q"],
                w["len_k"],
                ", ".join(f"{k.removeprefix('avar_')} {v:.3f}" for k, v in w["ms"].items()),
                w["winner"],
                fmt(w["speedup_over_other"], ".2f"),
            ]
            for w in winners
        ]
        lines += [*harness.markdown_table(headers, cells, "llrrrllr"), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in sorted(set(notes))), ""]
    harness.write_report(out_dir, "gpu_report", report, "\n".join(lines))


def main(argv=None):
    args, cfg = parse_args(argv)
    checks = {}
    if args.checks and os.path.exists(args.checks):
        with open(args.checks) as f:
            checks = json.load(f)
    notes = []
    results = []
    rows = plan(cfg)
    env = harness.environment(argv)
    if args.dry_run or not torch.cuda.is_available():
        notes.append("dry run: no measurement taken" + ("" if args.dry_run else " (no CUDA GPU)"))
        for direction, method, batch, len_q, len_k in rows:
            results.append(Result(direction, method, batch, len_q, len_k, note="not run"))
        write_report(args.out, cfg, results, notes, checks, harness.finish(env))
        print(f"planned {len(rows)} measurements; report skeleton in {args.out}")
        return 0

    deadline = time.monotonic() + cfg.budget_s
    for row in rows:
        left = deadline - time.monotonic()
        # Flex compiles on first use (tens of seconds); everything else needs a few seconds at most.
        need = 60.0 if row[1] == "flex" else 4 * cfg.measure_s + 2
        if left < need:
            results.append(Result(*row, note=f"skipped: {left:.0f} s of the budget left, needs ~{need:.0f} s"))
            continue
        t0 = time.monotonic()
        r = run_one(cfg, row, notes)
        results.append(r)
        print(
            f"{r.direction:6s} {r.method:10s} B={r.batch:3d} Lq={r.len_q:6d} Lk={r.len_k:6d} "
            f"ms={harness.fmt(r.ms, '.3f')} TFLOP/s={harness.fmt(r.tflops, '.1f')} "
            f"peak={harness.fmt(r.peak_mib, '.0f')}MiB ({time.monotonic() - t0:.1f}s) {r.note}",
            flush=True,
        )
        write_report(args.out, cfg, results, notes, checks, env)
    write_report(args.out, cfg, results, notes, checks, harness.finish(env))
    for w in tile_winners(results):
        print(
            f"[tiles] {device_arch()} {w['kind']} {w['direction']} B={w['batch']} Lq={w['len_q']} Lk={w['len_k']}: "
            f"{w['winner']} wins by {w['speedup_over_other']:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
