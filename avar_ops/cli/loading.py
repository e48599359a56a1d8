"""The model of `--model`: "tiny", "tiny:FAMILY" or a local checkpoint of a supported family, its shape read from
config.json before any weights load (so indices and dtypes are checked first), and the loading itself."""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

from avar_ops.cli.errors import CLIError, DataError

__all__ = ["model_shape", "context_length", "load_processor", "load_model"]


def _dtype(name: str):
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise CLIError(f"--dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def _shape(spec: Optional[str], arg: str):
    from avar_ops.analysis import ModelSpecError
    from avar_ops.analysis import model_shape as shape_of

    try:
        return shape_of(spec, arg)
    except ModelSpecError as exc:
        message = str(exc)
        # A config that cannot be read is the data's fault; a wrong argument is the caller's.
        raise (DataError if "JSON" in message or "no positive" in message else CLIError)(message) from None


def model_shape(spec: Optional[str], arg: str = "--model") -> Tuple[int, int, str]:
    """(attention layers, attention heads, weights dtype name) of "tiny", "tiny:FAMILY" or a checkpoint folder of a
    supported family, read from its config.json without loading weights, so that indices and dtypes are checked
    before the model loads. Layers count the softmax-attention layers (all but Qwen3.5's linear ones)."""
    shape = _shape(spec, arg)
    return shape.num_layers, shape.num_heads, shape.dtype


def context_length(spec: Optional[str], arg: str = "--model") -> int:
    """The text model's context length (max_position_embeddings) from config.json, without loading weights."""
    context = _shape(spec, arg).context
    if context is None:
        raise DataError(f"{arg}: {spec}/config.json has no positive max_position_embeddings")
    return context


def load_processor(spec: Optional[str]):
    """The processor of "tiny" / "tiny:FAMILY" or a local checkpoint directory, without the model's weights."""

    family = _tiny_family(spec)
    if family is not None:
        return _tiny_processor(family)
    try:
        return _local_processor(os.path.abspath(spec))
    except OSError as exc:
        raise CLIError(f"--model: cannot read the processor of {spec!r}: {exc}") from exc


@functools.lru_cache(maxsize=4)
def _local_processor(path: str):
    """A checkpoint's processor, read once per command (its prompt checks ask for it more than once)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


def _tiny_family(spec):
    from avar_ops.analysis import ModelSpecError, tiny_family

    try:
        return tiny_family(spec)
    except ModelSpecError as exc:
        raise CLIError(f"--model: {exc}") from None


@functools.lru_cache(maxsize=4)
def _tiny_processor(family: str):
    from avar_ops.analysis import build_tiny

    return build_tiny(family, seed=0)[1]


def load_model(spec: Optional[str], *, dtype: str = "auto", device: str = "cpu"):
    """(model, processor, label) for "tiny", "tiny:FAMILY" or a local checkpoint directory of a supported family."""
    from avar_ops.analysis import load_model_and_processor

    family = _tiny_family(spec)
    model_shape(spec)
    try:
        model, processor = load_model_and_processor(spec, dtype=_dtype(dtype), seed=0)
    except OSError as exc:
        raise CLIError(f"--model: cannot load {spec!r}: {exc}") from exc
    label = (
        "tiny" if spec in (None, "tiny") else spec if family is not None else os.path.basename(os.path.normpath(spec))
    )
    return model.to(device).eval(), processor, label
