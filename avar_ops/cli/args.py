"""The argument groups the `avar` commands share (model, intervention, counts, --data) and their checks, all
run before a model loads."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from avar_ops.cli.errors import CLIError, DataError

__all__ = [
    "MAX_NEW_TOKENS",
    "DEVICE_DTYPES",
    "add_model_args",
    "add_intervention_args",
    "intervention",
    "intervention_from_flags",
    "check_selection",
    "check_device",
    "check_batches",
    "check_counts",
    "add_data_format_arg",
    "load_data",
]

# Far beyond any answer the tools measure, and a bound on how long one command can run per sample.
MAX_NEW_TOKENS = 4096
# What the kernels take per device (--dtype); float64 is the CPU reference's, not a model dtype.
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16")}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (default: a tiny random Qwen2.5-VL, offline), 'tiny:FAMILY' (the tiny model of another "
        "supported family, e.g. tiny:glm4v) or a local checkpoint directory of a supported family",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: the checkpoint's own; float32 for the tiny model)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_intervention_args(p: argparse.ArgumentParser, *, with_values: bool = True) -> None:
    p.add_argument(
        "--mode",
        default="weights",
        choices=["weights", "logits", "bias"],
        help="weights: scale attention weights by (1+α) and renormalise (= logit bias log(1+α)); "
        "logits: scale logits by (1+α); bias: add β to the logits",
    )
    if with_values:
        p.add_argument("--alpha-img", type=float, default=0.0, help="α_img (modes weights, logits)")
        p.add_argument("--alpha-sys", type=float, default=0.0, help="α_sys, must be < 1 (modes weights, logits)")
        p.add_argument("--beta-img", type=float, default=0.0, help="β on image-key logits (mode bias)")
        p.add_argument("--beta-sys", type=float, default=0.0, help="β on system-key logits (mode bias)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers to act on (default all)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="heads to act on (default all)")


def intervention(args, img: float, sys_: float):
    """An Intervention from the mode and one (image, system) pair of values, or None when both are 0."""
    from avar_ops.method import Intervention

    if img == 0.0 and sys_ == 0.0:
        return None
    try:
        if args.mode == "bias":
            return Intervention(mode="bias", beta_img=img, beta_sys=sys_, layers=args.layers, heads=args.heads)
        return Intervention(mode=args.mode, alpha_img=img, alpha_sys=sys_, layers=args.layers, heads=args.heads)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc


def intervention_from_flags(args):
    if args.mode == "bias":
        if args.alpha_img or args.alpha_sys:
            raise CLIError("--mode bias reads --beta-img / --beta-sys; --alpha-img / --alpha-sys were given")
        return intervention(args, args.beta_img, args.beta_sys)
    if args.beta_img or args.beta_sys:
        raise CLIError(f"--mode {args.mode} reads --alpha-img / --alpha-sys; --beta-img / --beta-sys were given")
    return intervention(args, args.alpha_img, args.alpha_sys)


def check_selection(args, ivs, shape) -> None:
    """--layers / --heads (only meaningful with an intervention), --vas-layers and --heatmap-layers against the
    model's layer and head counts, with `avar_ops.core.select_indices`' rule (−n ≤ i < n)."""
    from avar_ops.core import select_indices

    num_layers, num_heads, _ = shape
    if all(iv is None for iv in ivs) and (args.layers is not None or args.heads is not None):
        values = "--beta-img / --beta-sys" if args.mode == "bias" else "--alpha-img / --alpha-sys"
        if args.command == "sweep":
            values = "a non-zero --alphas setting"
        raise CLIError(
            f"--layers / --heads choose where the intervention acts, but no intervention is given ({values})"
        )
    checks = [("--layers", args.layers, num_layers), ("--heads", args.heads, num_heads)]
    checks += [
        (f"--{name.replace('_', '-')}", getattr(args, name, None), num_layers)
        for name in ("vas_layers", "heatmap_layers")
    ]
    for flag, value, count in checks:
        try:
            select_indices(value, count, flag)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"{exc} (the model has {num_layers} layers of {num_heads} heads)") from None


def check_device(args, shape) -> None:
    """--device names a device that is there, and --dtype (or the checkpoint's own) is one its kernels take."""
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type not in DEVICE_DTYPES:
        raise CLIError(f"--device: avar runs on cpu or cuda, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: PyTorch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    dtype = shape[2] if args.dtype == "auto" else args.dtype
    allowed = DEVICE_DTYPES[device.type]
    if dtype not in allowed:
        source = f"--dtype {args.dtype}" if args.dtype != "auto" else f"the checkpoint's dtype ({dtype})"
        raise CLIError(
            f"{source}: the {device.type.upper()} kernels take {' or '.join(allowed)}; "
            f"pass --dtype {allowed[-1]}" + (" or --device cuda" if device.type == "cpu" else "")
        )


def check_batches(samples, batch_size: int) -> None:
    """A batch is padded into one processor call, which cannot mix samples with and without images."""
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        with_img = [s["id"] for s in batch if s["images"]]
        without = [s["id"] for s in batch if not s["images"]]
        if with_img and without:
            raise CLIError(
                f"--batch-size {batch_size}: samples {with_img} have images and {without} do not, in one batch; "
                "use --batch-size 1 or order the data so that they fall in different batches"
            )


def check_counts(args) -> None:
    for name in ("limit", "batch_size", "heatmaps", "max_new_tokens"):
        value = getattr(args, name, None)
        flag = f"--{name.replace('_', '-')}"
        if value is not None and value < (0 if name == "heatmaps" else 1):
            raise CLIError(
                f"{flag}: expected a {'non-negative' if name == 'heatmaps' else 'positive'} number, got {value}"
            )
    if (getattr(args, "max_new_tokens", None) or 0) > MAX_NEW_TOKENS:  # None: the command's own defaults
        raise CLIError(f"--max-new-tokens: at most {MAX_NEW_TOKENS}, got {args.max_new_tokens}")


def add_data_format_arg(p) -> None:
    from avar_ops.data import FORMATS

    p.add_argument(
        "--data-format",
        choices=FORMATS,
        default="auto",
        help="layout of --data: avar samples, LLaMA-Factory sharegpt, OpenAI chat messages, or auto (recognised "
        "per file)",
    )


def load_data(path: str, limit: Optional[int], data_format: str = "avar"):
    """The samples of --data, their images decoded once: a missing path is exit 2, bad content exit 1."""
    from avar_ops.data import check_images, load_samples

    if not os.path.exists(path):
        raise CLIError(f"--data: data file not found: {path}")
    if not os.path.isfile(path):
        raise CLIError(f"--data: {path!r} is a folder; expected a JSONL file")
    try:
        samples = load_samples(path, limit, data_format)
        check_images(samples)
    except (OSError, ValueError) as exc:
        raise DataError(f"--data: {exc}") from None
    return samples
