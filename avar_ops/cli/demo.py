"""`avar demo`: a tiny random model (Qwen2.5-VL by default) end to end: VAS, intervention, figures, on CPU."""

from __future__ import annotations

from avar_ops.cli.errors import CLIError
from avar_ops.cli.out import prepare_out

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="tiny random Qwen2.5-VL: VAS, intervention, figures (offline, CPU)")
    p.add_argument("--out", default="avar_demo_out", help="output folder (default ./avar_demo_out)")
    p.add_argument(
        "--family",
        default="qwen2_5_vl",
        help="the family of the tiny model (default qwen2_5_vl; the names `avar demo --family list` prints)",
    )
    p.set_defaults(run_command=run)


def run(args) -> int:
    from avar_ops.analysis import run_demo, tiny_family_names

    names = tiny_family_names()
    if args.family == "list":
        print("\n".join(names))
        return 0
    if args.family not in names:
        raise CLIError(f"--family: expected one of {', '.join(names)}, got {args.family!r}")
    run_demo(prepare_out(args.out, "demo", ["baseline", "intervention", "compare.png"]), family=args.family)
    return 0
