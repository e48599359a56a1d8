"""Model-level training-step benchmark on a Qwen2.5-VL-7B-shaped slice (hidden 3584, 28 heads, 4 kv heads, 2 layers,
random weights): the AGTO SFT step through avar against the stock SDPA step without attention loss (the floor)
and the eager-maps step (`output_attentions`), with step time and peak memory and their ratios measured in the
same run. See `sft_step.py` for what each step does and how it is measured.

    OMP_NUM_THREADS=2 python benchmarks/bench_train_step.py --lengths 1024 2048 --repeat 2

Writes benchmarks/results/<name>.json and .md (machine, ISA, versions, commit, command) unless --quick.
"""

from __future__ import annotations

import argparse

import grpo_step
import sft_step

import harness


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(sft_step.METHODS), choices=sft_step.METHODS)
    ap.add_argument(
        "--eager-limit-gb", type=float, default=10.0, help="skip the eager step where its maps alone would pass this"
    )
    ap.add_argument("--quick", action="store_true", help="L=256, one step each, no report: checks that it runs")
    ap.add_argument(
        "--grpo-lengths",
        type=int,
        nargs="*",
        default=[],
        help="also time one GRPO step (generation / scoring / update) at these lengths "
        "(benchmarks/grpo_step.py; each method in its own process)",
    )
    ap.add_argument("--grpo-rollouts", type=int, default=2)
    ap.add_argument("--grpo-new-tokens", type=int, default=8)
    ap.add_argument("--name", default="cpu_train_step")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeat = [256], 1
    env = harness.environment(argv)
    rows = sft_step.run(args.lengths, args.repeat, tuple(args.methods), args.eager_limit_gb)
    payload = {"environment": env, "sft": rows}
    if args.grpo_lengths:
        grpo_lengths, new_tokens = ([192], 4) if args.quick else (args.grpo_lengths, args.grpo_new_tokens)
        grpo_rows = grpo_step.run_all(grpo_lengths, args.grpo_rollouts, new_tokens, 1)
        payload["grpo"] = grpo_rows
    harness.finish(env)
    lines = [
        "# Training step on a Qwen2.5-VL-7B-shaped slice",
        "",
        *harness.environment_lines(env),
        "",
        "Ratios are against the SDPA step measured in the same run.",
        "",
    ]
    lines += sft_step.markdown(rows, tuple(args.methods))
    if args.grpo_lengths:
        lines += ["", "## GRPO step", ""] + grpo_step.table(payload["grpo"])
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.quick:
        harness.write_report(harness.RESULTS, args.name, payload, markdown)


if __name__ == "__main__":
    main()
