"""Model families the patch supports: one small module per family, registered here.

`family_of(model)` picks the family from the model config's `model_type`; `get_family(name)` by name. To add a
family: a module with a `Family` subclass (avar_ops/hf/families/base.py has the contract) and one `register` line
below; docs/contributing.md walks through it.
"""

from __future__ import annotations

from typing import Dict, List

from avar_ops.hf.families.base import Family

__all__ = [
    "Family",
    "register",
    "get_family",
    "family_of",
    "supported_families",
    "attention_layer_indices",
    "load_pretrained",
]

_FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    if not family.name or not family.model_types:
        raise ValueError(f"register: a family needs a name and model_types, got {family!r}")
    for other in _FAMILIES.values():
        clash = set(other.model_types) & set(family.model_types)
        if other.name != family.name and clash:
            raise ValueError(f"register: model types {sorted(clash)} already belong to {other.name}")
    _FAMILIES[family.name] = family
    return family


def supported_families() -> List[Family]:
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    family = _FAMILIES.get(name)
    if family is None:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(sorted(_FAMILIES))}")
    return family


def family_of(model) -> Family:
    """The family of a model (or of its config, or a config.json dict), from `config.model_type`; ValueError
    naming the supported ones."""
    config = getattr(model, "config", model)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in _FAMILIES.values())
    raise ValueError(
        f"avar patch: model type {model_type!r} ({type(model).__name__}) is not a supported family; supported: "
        f"{supported}"
    )


def _text_section(config):
    """The text decoder's part of a config (a PretrainedConfig or the dict of a config.json)."""
    if isinstance(config, dict):
        text = config.get("text_config")
        return text if isinstance(text, dict) else config
    return getattr(config, "text_config", None) or config


def attention_layer_indices(config) -> List[int]:
    """Decoder-layer indices with softmax attention, read from a config or a config.json dict (no model built).

    Every layer, except those whose `layer_types` entry is a linear-attention type (Qwen3.5). Raises ValueError
    when the config names no positive layer count.
    """
    from avar_ops.hf.families.base import LINEAR_LAYER_TYPES

    text = _text_section(config)
    get = text.get if isinstance(text, dict) else lambda k, d=None: getattr(text, k, d)
    count = get("num_hidden_layers")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"the model config has no positive num_hidden_layers (got {count!r})")
    types = get("layer_types") or ["full_attention"] * count
    return [i for i, kind in enumerate(types[:count]) if kind not in LINEAR_LAYER_TYPES]


def load_pretrained(path, **kwargs):
    """A checkpoint folder of a supported family, loaded with its family's class (local files only).

    ValueError naming the supported families when the folder's `model_type` is none of them.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    kwargs.setdefault("local_files_only", True)
    return family.model_class().from_pretrained(path, **kwargs)


from avar_ops.hf.families import (  # noqa: E402
    glm4v,
    qwen2_5_vl,
    qwen3_5,
    qwen_vl,
)

register(qwen2_5_vl.Qwen2_5_VL())
register(glm4v.Glm4v())
register(glm4v.Glm4vMoe())
register(qwen_vl.Qwen2_VL())
register(qwen_vl.Qwen3_VL())
register(qwen_vl.Qwen3_VL_MoE())
register(qwen3_5.Qwen3_5())

from avar_ops.hf.families import llava_onevision  # noqa: E402

register(llava_onevision.LlavaOnevision())

from avar_ops.hf.families import internvl  # noqa: E402

register(internvl.InternVL())
