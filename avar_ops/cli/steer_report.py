"""`avar steer-report`: what a steering file learned, as layer × head heatmaps per key group and a table of the
(layer, head) rows that moved most from plain attention."""

from __future__ import annotations

import json
import os

from avar_ops.cli.errors import CLIError, DataError
from avar_ops.cli.out import prepare_out

__all__ = ["add_parser", "run"]

_RESULTS = ["steering_bias.png", "steering_logit_scale.png", "steer_report.json"]


def add_parser(sub) -> None:
    p = sub.add_parser("steer-report", help="heatmaps and the most-moved heads of a steering file (avar-train steer)")
    p.add_argument("file", metavar="FILE", help="a steering file (output_dir/steering.safetensors of avar-train steer)")
    p.add_argument("--out", default=None, help="folder for the heatmaps and steer_report.json (default: print only)")
    p.add_argument("--top", type=int, default=10, help="how many (layer, head) rows to list (default 10)")
    p.set_defaults(run_command=run)


def run(args) -> int:
    from avar_ops.analysis import moves_table, steering_heatmaps, steering_moves
    from avar_ops.hf import SteeringError, load_steering

    if args.top < 1:
        raise CLIError(f"--top: expected a positive number, got {args.top}")
    if not os.path.exists(args.file):
        raise CLIError(f"FILE: steering file not found: {args.file}")
    if not os.path.isfile(args.file):
        raise CLIError(f"FILE: {args.file!r} is a folder; expected a steering .safetensors file")
    try:
        steering = load_steering(args.file)
    except SteeringError as exc:
        raise DataError(str(exc)) from None
    out = prepare_out(args.out, "steer-report", _RESULTS) if args.out is not None else None
    moves = steering_moves(steering, args.top)
    trained = steering.trained
    print(f"{args.file}: {steering.shape_text()}, avar {steering.avar_version or '?'}, commit {steering.commit or '?'}")
    if trained:
        keys = ("trainer", "step", "alpha", "beta", "learning_rate", "train_logit_scale", "init_mode", "init_img")
        print("  trained: " + ", ".join(f"{k}={trained[k]}" for k in keys if k in trained))
    print(f"The {len(moves)} (layer, head) rows that moved most from plain attention (β = 0, γ = 1):")
    print(moves_table(moves))
    if out is not None:
        paths = steering_heatmaps(steering, out)
        report = os.path.join(out, "steer_report.json")
        with open(report, "w", encoding="utf-8") as f:
            json.dump({"file": args.file, **steering.metadata(), "moved": [m.to_dict() for m in moves]}, f, indent=1)
        for name, path in {**paths, "report": report}.items():
            print(f"  {name}: {path}")
    return 0
