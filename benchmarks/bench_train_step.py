"""Model-level training-step benchmark on a Qwen2.5-VL-7B-shaped slice (hidden 3584, 28 heads, 4 kv heads, 2 layers,
random weights): the AGTO SFT step through avar against the stock SDPA step without attention loss (the floor)
and the eager-maps step (`output_attentions`), with step time and peak memory and their ratios measured in the
same run. See `sft_step.py` for what each step does and how it is measured.

    OMP_NUM_THREADS=2 python benchmarks/bench_train_step.py --lengths 1024 2048 --repeat 2

Writes benchmarks/results/<name>.json and .md (machine, ISA, versions, commit, command) unless --quick.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line, write_report  # noqa: E402

import grpo_step  # noqa: E402
import sft_step  # noqa: E402


def machine_info() -> dict:
    import platform
    from datetime import datetime, timezone

    import torch

    import avar_ops
    from avar_ops.core import load_extension

    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
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


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _isa() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "fma")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(sft_step.METHODS), choices=sft_step.METHODS)
    ap.add_argument("--eager-limit-gb", type=float, default=10.0,
                    help="skip the eager step where its maps alone would pass this")
    ap.add_argument("--quick", action="store_true", help="L=256, one step each, no report: checks that it runs")
    ap.add_argument("--grpo-lengths", type=int, nargs="*", default=[],
                    help="also time one GRPO step (generation / scoring / update) at these lengths "
                         "(benchmarks/grpo_step.py; each method in its own process)")
    ap.add_argument("--grpo-rollouts", type=int, default=2)
    ap.add_argument("--grpo-new-tokens", type=int, default=8)
    ap.add_argument("--name", default="cpu_train_step")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeat = [256], 1
    info = dict(machine_info(), isa=_isa(), commit=_commit())
    for pkg in ("transformers", "accelerate"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    command = command_line("bench_train_step.py", argv)
    rows = sft_step.run(args.lengths, args.repeat, tuple(args.methods), args.eager_limit_gb)
    lines = ["# Training step on a Qwen2.5-VL-7B-shaped slice", "",
             f"Machine: {info['cpu']}, {info['threads']} threads, ISA {info['isa']}; torch {info['torch']}, "
             f"transformers {info['transformers']}, avar {info['avar']} (commit {info['commit']}), {info['date']}.",
             f"Command: `{command}`", "", "Ratios are against the SDPA step measured in the same run.", ""]
    lines += sft_step.markdown(rows, tuple(args.methods))
    payload = {"machine": info, "command": command, "sft": rows}
    if args.grpo_lengths:
        grpo_lengths, new_tokens = ([192], 4) if args.quick else (args.grpo_lengths, args.grpo_new_tokens)
        grpo_rows = grpo_step.run_all(grpo_lengths, args.grpo_rollouts, new_tokens, 1)
        lines += ["", "## GRPO step", ""] + grpo_step.table(grpo_rows)
        payload["grpo"] = grpo_rows
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.quick:
        write_report(args.name, payload, markdown)


if __name__ == "__main__":
    main()
