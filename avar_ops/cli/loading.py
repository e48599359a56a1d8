"""The model of `--model`: "tiny" or a local checkpoint of a supported family, its shape read from config.json
before any weights load (so indices and dtypes are checked first), and the loading itself."""

from __future__ import annotations

import functools
import inspect
import json
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


def model_shape(spec: Optional[str], arg: str = "--model") -> Tuple[int, int, str]:
    """(softmax-attention layers, attention heads, weights dtype name) of "tiny" / None or a checkpoint folder of
    a supported family, read from its config.json without loading weights, so that indices and dtypes are checked
    before the model loads. The layers are every decoder layer but in hybrid decoders (Qwen3.5's)."""
    if spec in (None, "tiny"):
        from avar_ops.analysis import build_tiny_qwen2_5_vl

        params = inspect.signature(build_tiny_qwen2_5_vl).parameters
        return int(params["num_layers"].default), int(params["num_heads"].default), "float32"
    if not os.path.exists(spec):
        raise CLIError(f"{arg}: {spec!r} does not exist (expected 'tiny' or a local checkpoint directory)")
    if not os.path.isdir(spec):
        raise CLIError(f"{arg}: {spec!r} is a file; expected 'tiny' or a checkpoint directory with config.json")
    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"{arg}: {spec!r} has no config.json; it is not a Hugging Face checkpoint directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{arg}: {config_path} is not valid JSON ({exc})") from None
    from avar_ops.hf import attention_layer_indices, supported_families

    families = supported_families()
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not any(model_type in f.model_types for f in families):
        names = ", ".join(f"{f.title} ({'/'.join(repr(t) for t in f.model_types)})" for f in families)
        raise CLIError(f"{arg}: {spec!r} holds a {model_type!r} model; avar supports {names}")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    # Older checkpoints keep the text model's numbers at the top level.
    layers = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    heads = text.get("num_attention_heads", config.get("num_attention_heads"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, heads)):
        raise DataError(f"{arg}: {config_path} has no positive num_hidden_layers / num_attention_heads")
    # Layer indices count the softmax-attention layers (all but Qwen3.5's linear-attention ones).
    layers = len(attention_layer_indices({"num_hidden_layers": layers, "layer_types": text.get("layer_types")}))
    dtype = text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    return layers, heads, str(dtype or "float32")


def context_length(spec: Optional[str], arg: str = "--model") -> int:
    """The text model's context length (max_position_embeddings) from config.json, without loading weights."""
    if spec in (None, "tiny"):
        from avar_ops.analysis import TINY_MAX_POSITIONS

        return TINY_MAX_POSITIONS
    model_shape(spec, arg)
    with open(os.path.join(spec, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{arg}: {spec}/config.json has no positive max_position_embeddings")
    return value


@functools.lru_cache(maxsize=1)
def _tiny_processor():
    from avar_ops.analysis import build_tiny_processor

    return build_tiny_processor()


def load_processor(spec: Optional[str]):
    """The processor of "tiny" / None or a local checkpoint directory, without the model's weights."""
    if spec in (None, "tiny"):
        return _tiny_processor()
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(spec, local_files_only=True)
    except OSError as exc:
        raise CLIError(f"--model: cannot read the processor of {spec!r}: {exc}") from exc


def load_model(spec: Optional[str], *, dtype: str = "auto", device: str = "cpu"):
    """(model, processor, label) for "tiny" / None or a local checkpoint directory of a supported family."""
    import torch

    if spec in (None, "tiny"):
        from avar_ops.analysis import build_tiny_qwen2_5_vl

        dt = _dtype(dtype)
        model, processor = build_tiny_qwen2_5_vl(seed=0, dtype=torch.float32 if dt == "auto" else dt)
        return model.to(device), processor, "tiny"
    model_shape(spec)
    from transformers import AutoProcessor

    from avar_ops.hf import load_pretrained

    try:
        model = load_pretrained(spec, dtype=_dtype(dtype), attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(spec, local_files_only=True)
    except OSError as exc:
        raise CLIError(f"--model: cannot load {spec!r}: {exc}") from exc
    return model.to(device).eval(), processor, os.path.basename(os.path.normpath(spec))
