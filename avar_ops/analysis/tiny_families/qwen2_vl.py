"""A tiny random Qwen2-VL and its offline processor, built in seconds on CPU with nothing downloaded.

Qwen2-VL is Qwen2.5-VL's predecessor with the same tokenizer, special tokens and chat template (default system
prompt when the first message is not a system message, `<|vision_start|><|image_pad|><|vision_end|>` per image),
so the processor reuses `avar_ops.analysis.tiny_qwen`'s tokenizer, image and video processors and wraps them in
`Qwen2VLProcessor`. What differs is the model: MRoPE with contiguous (not interleaved) temporal / height / width
frequency sections and no absolute time in the temporal ids, and a vision tower whose blocks all attend over
the whole image (no windowed blocks), with 14-pixel patches merged 2×2.
"""

from __future__ import annotations

from typing import Tuple

import torch

from avar_ops.analysis.tiny_common import build_model, qwen2_vl_text_config, qwen_ids, qwen_vision_ids
from avar_ops.analysis.tiny_qwen import CHAT_TEMPLATE, build_tiny_processor

__all__ = ["build", "build_processor"]


def build_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """Qwen2-VL processor with the tiny Qwen tokenizer; an image becomes 4 (56×56) to 16 (112×112) tokens."""
    from transformers import Qwen2VLProcessor

    parts = build_tiny_processor(min_pixels, max_pixels)
    return Qwen2VLProcessor(
        image_processor=parts.image_processor,
        tokenizer=parts.tokenizer,
        video_processor=parts.video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build(
    seed: int = 0,
    *,
    num_layers: int = 3,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    init_std: float = 0.1,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised `Qwen2VLForConditionalGeneration` (eval mode) and its offline processor.

    GQA text decoder of `num_layers` layers (`num_heads` query heads over `num_kv_heads` kv heads), a vision
    tower of `vision_depth` blocks; weights drawn with std `init_std` (see `tiny_qwen.build_tiny_qwen2_5_vl`).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor = build_processor(min_pixels, max_pixels)
    tok = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=qwen2_vl_text_config(
            "tiny qwen2_vl",
            tok,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            init_std=init_std,
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=32,
            hidden_size=hidden_size,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=init_std,
        ),
        initializer_range=init_std,
        **qwen_vision_ids(tok),
        attn_implementation=attn_implementation,
    )
    model = build_model(Qwen2VLForConditionalGeneration, config, seed=seed, dtype=dtype, **qwen_ids(tok))
    return model, processor
