"""`avar generate`: answer one question about images, with or without the intervention."""

from __future__ import annotations

import os

from avar_ops.cli import loading
from avar_ops.cli.args import (
    MAX_NEW_TOKENS,
    add_intervention_args,
    add_model_args,
    check_device,
    check_selection,
    intervention_from_flags,
)
from avar_ops.cli.errors import CLIError, DataError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one question about images, with or without the intervention")
    add_model_args(p)
    p.add_argument("--image", nargs="+", required=True, help="image path(s)")
    p.add_argument("--question", required=True)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help=f"answer length (at most {MAX_NEW_TOKENS})")
    p.add_argument("--baseline", action="store_true", help="also print the answer without the intervention")
    p.add_argument("--no-progress", action="store_true")
    add_intervention_args(p)
    p.set_defaults(run_command=run)


def run(args) -> int:
    from avar_ops.analysis import generate_answers
    from avar_ops.data import check_images, normalize_sample

    for p in args.image:
        if os.path.isdir(p):
            raise CLIError(f"--image: {p!r} is a folder; expected an image file")
        if not os.path.isfile(p):
            raise CLIError(f"--image: file not found: {p}")
    try:
        sample = normalize_sample(
            {"images": args.image, "question": args.question, "system": args.system}, 0, where="arguments"
        )
    except ValueError as exc:
        raise CLIError(f"--question / --system: {exc}") from None
    try:
        check_images([sample])
    except ValueError as exc:
        raise DataError(f"--image: {exc}") from None
    iv = intervention_from_flags(args)
    shape = loading.model_shape(args.model)
    check_selection(args, [iv], shape)
    check_device(args, shape)
    model, processor, _ = loading.load_model(args.model, dtype=args.dtype, device=args.device)
    progress = not args.no_progress
    if iv is None or args.baseline:
        base = generate_answers(model, processor, [sample], max_new_tokens=args.max_new_tokens, progress=progress)[0]
        print(f"[no intervention] {base['answer']}")
    if iv is not None:
        out = generate_answers(
            model, processor, [sample], intervention=iv, max_new_tokens=args.max_new_tokens, progress=progress
        )[0]
        print(f"[{iv.describe()}] {out['answer']}")
    return 0
