"""`avar demo`: the tiny random Qwen2.5-VL end to end (VAS, intervention, figures), offline on the CPU."""

from __future__ import annotations

from avar_ops.cli.out import prepare_out

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="tiny random Qwen2.5-VL: VAS, intervention, figures (offline, CPU)")
    p.add_argument("--out", default="avar_demo_out", help="output folder (default ./avar_demo_out)")
    p.set_defaults(run_command=run)


def run(args) -> int:
    from avar_ops.analysis import run_demo

    run_demo(prepare_out(args.out, "demo", ["baseline", "intervention", "compare.png"]))
    return 0
