"""Tiny random models of every supported family, built offline in seconds, with processors that reproduce the
real family's chat template, special tokens and image processing.

`TINY_BUILDERS[name](seed=0, *, attn_implementation="sdpa", dtype=torch.float32, ...)` returns (model,
processor) for the family `name` (the names of `avar_ops.hf.supported_families()`); `build_tiny(name, ...)`
refuses an unknown name in one line. Tests, `avar demo --family NAME` and the benchmarks use them.
"""

from __future__ import annotations

from typing import Callable, Dict

from avar_ops.analysis import tiny_qwen
from avar_ops.analysis.tiny_families import internvl, llava_onevision

__all__ = ["TINY_BUILDERS", "build_tiny", "tiny_family_names"]

TINY_BUILDERS: Dict[str, Callable] = {"qwen2_5_vl": tiny_qwen.build_tiny_qwen2_5_vl}
TINY_BUILDERS["llava_onevision"] = llava_onevision.build
TINY_BUILDERS["internvl"] = internvl.build


def tiny_family_names():
    return sorted(TINY_BUILDERS)


def build_tiny(family: str, seed: int = 0, **kwargs):
    """(model, processor) of the tiny model of `family`."""
    builder = TINY_BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown family {family!r}; tiny models exist for: {', '.join(tiny_family_names())}")
    return builder(seed=seed, **kwargs)


from avar_ops.analysis.tiny_families import qwen2_vl, qwen3_5, qwen3_vl, qwen3_vl_moe  # noqa: E402

TINY_BUILDERS["qwen2_vl"] = qwen2_vl.build
TINY_BUILDERS["qwen3_vl"] = qwen3_vl.build
TINY_BUILDERS["qwen3_vl_moe"] = qwen3_vl_moe.build
TINY_BUILDERS["qwen3_5"] = qwen3_5.build

from avar_ops.analysis.tiny_families import glm4v  # noqa: E402

TINY_BUILDERS["glm4v"] = glm4v.build
TINY_BUILDERS["glm4v_moe"] = glm4v.build_moe
