"""What the op's value checks cost on the CPU, next to the op itself (decode steps, where it matters most).

The value checks (key_group range, finite and non-overflowing bias / logit_scale, cu_seqlens contents) read
tensor contents on the host. They always run for CPU inputs; on CUDA they run only under
avar_ops.set_input_checks(True) / AVAR_CHECK_INPUTS=1, since there each read waits for the GPU. Here the same
reads are replayed from Python on the same tensors (an upper bound: Python adds its own call overhead) and
timed in the same run as the whole op call.

    OMP_NUM_THREADS=2 python benchmarks/bench_checks.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import avar_ops
from avar_ops.core import NUM_GROUPS

import harness
from problems import make_problem

H, HKV, D = 28, 4, 128


def value_check_reads(key_group, bias, logit_scale, cu_q, cu_k):
    """The reads the C++ value checks make, one for one."""
    if key_group is not None:
        key_group.min().item()
        key_group.max().item()
    for t in (bias, logit_scale):
        if t is not None:
            t.to(torch.float32).to("cpu", torch.float64).contiguous().reshape(-1).tolist()
    for cu in (cu_q, cu_k):
        if cu is not None:
            cu.to("cpu").contiguous().tolist()


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_op_and_checks(qkv, kw, repeats: int):
    """Median µs of the whole op call and of its value-check reads, on the same inputs."""
    op = median_us(lambda: avar_ops.attention(*qkv, **kw), repeats)
    tables = (kw["key_group"], kw["bias"], kw["logit_scale"], kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"))
    checks = median_us(lambda: value_check_reads(*tables), repeats)
    return op, checks


def decode_problem(batch: int, cache: int, dtype, varlen: bool):
    """One new query token per sequence against a cache of `cache` keys (Qwen2.5-VL-7B text layer shapes)."""
    q, k, v, kg, bias = make_problem(cache, dtype, H=H, Hkv=HKV, D=D, B=batch)
    q = q[:, -1:].contiguous()  # [B, 1, H, D]
    logit_scale = torch.ones(H, NUM_GROUPS)  # [H, G]
    kw = dict(key_group=kg, bias=bias, logit_scale=logit_scale, return_mass=True)
    if not varlen:
        return (q, k, v), kw
    kw.update(
        key_group=kg.reshape(-1),  # [B·Lk]
        cu_seqlens_q=torch.arange(0, batch + 1, dtype=torch.int32),
        cu_seqlens_k=torch.arange(0, batch + 1, dtype=torch.int32) * cache,
        max_seqlen_q=1,
        max_seqlen_k=cache,
    )
    return (q.reshape(batch, H, D), k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)), kw


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive number, got {args.repeats}")

    env = harness.environment(argv)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch, cache, varlen in ((1, 1024, False), (1, 4096, False), (4, 1024, True)):
            qkv, kw = decode_problem(batch, cache, dtype, varlen)
            op, checks = time_op_and_checks(qkv, kw, args.repeats)
            layout = f"varlen B={batch}" if varlen else f"B={batch}"
            rows.append(
                {
                    "dtype": str(dtype).replace("torch.", ""),
                    "layout": layout,
                    "cache": cache,
                    "op_us": op,
                    "checks_us": checks,
                    "checks_over_op": checks / op,
                }
            )
    harness.finish(env)
    lines = [
        "# CPU cost of the value checks (decode step: 1 query per sequence, H = 28, H_kv = 4, D = 128)",
        "",
        *harness.environment_lines(env),
        "",
        "Checks: the same host reads as the op's value checks, replayed from Python (an upper bound). Absolute "
        "times are inflated on a shared machine; the ratio of two timings taken side by side less so.",
        "",
        *harness.markdown_table(
            ["dtype", "layout", "cache", "op call (µs)", "value checks (µs)", "checks / op"],
            [
                [
                    r["dtype"],
                    r["layout"],
                    r["cache"],
                    f"{r['op_us']:.1f}",
                    f"{r['checks_us']:.1f}",
                    f"{r['checks_over_op']:.3f}",
                ]
                for r in rows
            ],
            align="llrrrr",
        ),
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_save:
        paths = harness.write_report(harness.RESULTS, "cpu_checks", {"environment": env, "results": rows}, report)
        print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
