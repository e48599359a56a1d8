"""What a model argument names: "tiny" (the embedded tiny Qwen2.5-VL), "tiny:FAMILY" (the tiny model of another
supported family) or a local checkpoint folder of a supported family; its shape read before any weights load,
and the loading itself. The CLI and the trainers take model arguments through here.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["ModelSpecError", "ModelShape", "tiny_family", "model_shape", "load_model_and_processor"]

DEFAULT_TINY = "qwen2_5_vl"


class ModelSpecError(ValueError):
    """The model argument names nothing avar can load; the message is one line."""


@dataclass(frozen=True)
class ModelShape:
    family: str  # the family's name (avar_ops.hf.supported_families())
    num_layers: int  # softmax-attention layers (what tables, masses and layer indices count)
    num_heads: int  # query heads of the text decoder
    context: Optional[int]  # max_position_embeddings of the text decoder (None: the config does not say)
    dtype: str  # the weights' dtype name as the checkpoint records it ("float32" for tiny models)


def tiny_family(spec: Optional[str]) -> Optional[str]:
    """The family of a "tiny" / "tiny:FAMILY" spec (None: a checkpoint folder); ModelSpecError for an unknown one."""
    if spec is None or spec == "tiny":
        return DEFAULT_TINY
    if not isinstance(spec, str) or not spec.startswith("tiny:"):
        return None
    from avar_ops.analysis.tiny_families import tiny_family_names

    name = spec.split(":", 1)[1]
    if name not in tiny_family_names():
        raise ModelSpecError(f"{spec!r}: no tiny model of family {name!r}; known: {', '.join(tiny_family_names())}")
    return name


@functools.lru_cache(maxsize=8)
def _tiny_shape(family: str) -> ModelShape:
    from avar_ops.analysis.tiny_families import build_tiny
    from avar_ops.hf import attention_layer_indices

    model, _ = build_tiny(family, seed=0)
    text = getattr(model.config, "text_config", None) or model.config
    return ModelShape(
        family=family,
        num_layers=len(attention_layer_indices(model.config)),
        num_heads=int(text.num_attention_heads),
        context=int(text.max_position_embeddings),
        dtype="float32",
    )


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def model_shape(spec: Optional[str], arg: str = "--model") -> ModelShape:
    """The shape of the model `spec` names, from config.json (no weights read); ModelSpecError in one line."""
    family = tiny_family(spec)
    if family is not None:
        return _tiny_shape(family)
    from avar_ops.hf import attention_layer_indices, family_of, supported_families

    if not os.path.exists(spec):
        raise ModelSpecError(f"{arg}: {spec!r} does not exist (expected 'tiny', 'tiny:FAMILY' or a checkpoint folder)")
    if not os.path.isdir(spec):
        raise ModelSpecError(f"{arg}: {spec!r} is a file; expected 'tiny' or a checkpoint directory with config.json")
    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise ModelSpecError(f"{arg}: {spec!r} has no config.json; it is not a Hugging Face checkpoint directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{arg}: {config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{arg}: {config_path} does not hold a JSON object")
    model_type = config.get("model_type")
    try:
        family = family_of(config)
    except ValueError:
        names = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in supported_families())
        raise ModelSpecError(f"{arg}: {spec!r} holds a {model_type!r} model; avar supports {names}") from None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    # Older checkpoints keep the text model's numbers at the top level.
    heads = text.get("num_attention_heads", config.get("num_attention_heads"))
    context = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    try:
        layers = len(attention_layer_indices({**config, "text_config": text}))
    except ValueError:
        layers = 0
    if not all(_positive(v) for v in (layers, heads)):
        raise ModelSpecError(f"{arg}: {config_path} has no positive num_hidden_layers / num_attention_heads")
    context = context if _positive(context) else None
    dtype = text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    return ModelShape(family.name, layers, heads, context, str(dtype or "float32"))


def load_model_and_processor(spec: Optional[str], *, dtype=None, seed: int = 0, processor_kwargs=None):
    """(model in eval mode, processor) for "tiny" / "tiny:FAMILY" or a local checkpoint folder of a supported
    family (local files only). `dtype`: a torch dtype, "auto" or None (float32 for tiny models)."""
    import torch

    family = tiny_family(spec)
    if family is not None:
        from avar_ops.analysis.tiny_families import build_tiny

        kwargs = dict(processor_kwargs or {})
        model, processor = build_tiny(
            family, seed=seed, dtype=torch.float32 if dtype in (None, "auto") else dtype, **kwargs
        )
        return model.eval(), processor
    from transformers import AutoProcessor

    from avar_ops.hf import load_pretrained

    model_shape(spec)
    model = load_pretrained(spec, dtype=dtype if dtype is not None else torch.float32, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(spec, local_files_only=True, **(processor_kwargs or {}))
    return model.eval(), processor
