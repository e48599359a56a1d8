"""A tiny random Qwen3-VL-MoE and its offline processor, built in seconds on CPU with nothing downloaded.

Qwen3-VL-MoE is Qwen3-VL (same processor, chat template, interleaved MRoPE, DeepStack; see
`avar_ops.analysis.tiny_families.qwen3_vl`) whose decoder MLPs are sparse mixtures of experts: a router picks
`num_experts_per_tok` of `num_experts` SwiGLU experts per token and mixes their outputs by the renormalised
router probabilities. The attention layers are the dense model's, so avar's patch is the same; the tiny model
keeps 4 experts with 2 active per token so that routing varies between tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from avar_ops.analysis.tiny_common import build_model, qwen_ids
from avar_ops.analysis.tiny_families.qwen3_vl import build_config, build_processor

__all__ = ["build"]


def build(
    seed: int = 0,
    *,
    num_layers: int = 3,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    deepstack_layers: Optional[Sequence[int]] = None,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    init_std: float = 0.1,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    min_pixels: int = 64 * 64,
    max_pixels: int = 128 * 128,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised `Qwen3VLMoeForConditionalGeneration` (eval mode) and its offline processor.

    Every decoder layer's MLP is a mixture of `num_experts` experts (intermediate size hidden_size / 2 each),
    `num_experts_per_tok` of them active per token; the other arguments are `qwen3_vl.build`'s.
    """
    from transformers import Qwen3VLMoeForConditionalGeneration

    if not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(
            f"tiny qwen3_vl_moe: need 1 <= num_experts_per_tok <= num_experts, got num_experts={num_experts}, "
            f"num_experts_per_tok={num_experts_per_tok}"
        )
    processor = build_processor(min_pixels, max_pixels)
    config = build_config(
        processor,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vision_depth=vision_depth,
        deepstack_layers=deepstack_layers,
        init_std=init_std,
        attn_implementation=attn_implementation,
        moe=dict(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=hidden_size // 2,
            decoder_sparse_step=1,
        ),
    )
    model = build_model(
        Qwen3VLMoeForConditionalGeneration, config, seed=seed, dtype=dtype, **qwen_ids(processor.tokenizer)
    )
    return model, processor
