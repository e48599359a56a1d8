"""The spread of r_visual on the README's first run: the example set, the tiny model, CPU.

Runs the README's SFT command (60 AGTO steps), then its GRPO command once per `visual_reward` definition
(`ratio`, the paper's Eq. 5, and `capped_ratio` with cap 2; everything else as the README has it), and reports
per GRPO step the per-token ratio's median and maximum (`r_visual_token_p50` / `_max`) and the step's mean
r_visual before and after the correctness gate (`r_visual_raw`, `r_visual`), from each run's log.jsonl.
These are the numbers the README quotes in "GRPO with the visual-anchored reward".

    OMP_NUM_THREADS=2 python benchmarks/rvisual_example.py            # writes results/cpu_rvisual_example.*
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import harness

COLUMNS = ("r_visual_token_p50", "r_visual_token_max", "r_visual_raw", "r_visual")


def _sft_args(out: str) -> list:
    return [
        "sft",
        "--config",
        "training/configs/sft_tiny.yaml",
        "max_steps=60",
        "train_file=examples/shapes/train.jsonl",
        "eval_file=examples/shapes/eval.jsonl",
        "eval_steps=20",
        f"output_dir={out}",
    ]


def _grpo_args(sft: str, out: str, kind: str) -> list:
    args = [
        "grpo",
        "--config",
        "training/configs/grpo_tiny.yaml",
        f"model_name_or_path={sft}",
        "train_file=examples/shapes/train.jsonl",
        "eval_file=examples/shapes/eval.jsonl",
        "max_completion_length=48",
        "learning_rate=1.0e-4",
        f"visual_reward={kind}",
        f"output_dir={out}",
    ]
    return args + (["visual_reward_cap=2"] if kind == "capped_ratio" else [])


def _steps(log: str) -> list:
    with open(log, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{"step": r["step"], **{c: r[c] for c in COLUMNS}} for r in rows if all(c in r for c in COLUMNS)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="cpu_rvisual_example", help="report file name under benchmarks/results")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    args = ap.parse_args(argv)
    from avar_train.cli import main as train

    env = harness.environment()
    os.chdir(harness.ROOT)  # the README's paths are relative to the repository root
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        sft = os.path.join(tmp, "sft")
        if train(_sft_args(sft)) != 0:
            raise SystemExit("the SFT run failed")
        for kind in ("ratio", "capped_ratio"):
            out = os.path.join(tmp, kind)
            if train(_grpo_args(sft, out, kind)) != 0:
                raise SystemExit(f"the GRPO run with visual_reward={kind} failed")
            runs[kind] = _steps(os.path.join(out, "log.jsonl"))
    env = harness.finish(env)
    rows = [[kind, s["step"], *(f"{s[c]:.4g}" for c in COLUMNS)] for kind, steps in runs.items() for s in steps]
    lines = [
        "# r_visual on the README's first run (example set, tiny model, CPU)",
        "",
        *harness.environment_lines(env),
        "",
        "GRPO after 60 AGTO SFT steps, the README's commands; per step: the per-token ratio image / (system + 1e-6)",
        "over the response tokens and layers (median, maximum), and the step's mean r_visual before and after the",
        "correctness gate (0 for a wrong answer).",
        "",
        *harness.markdown_table(
            ["visual_reward", "step", "token ratio p50", "token ratio max", "r_visual before gating", "r_visual"], rows
        ),
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_save:
        harness.write_report(
            os.path.join(harness.ROOT, "benchmarks", "results"), args.name, {"environment": env, "runs": runs}, markdown
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
