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

from avar_ops.analysis.tiny_qwen import CHAT_TEMPLATE, SPECIAL_TOKENS, TINY_MAX_POSITIONS, build_tiny_processor

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

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"tiny qwen2_vl: need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    head_dim = hidden_size // num_heads
    if head_dim % 4:
        raise ValueError(f"tiny qwen2_vl: head_dim = {head_dim} must be a multiple of 4 (3D rotary split)")
    processor = build_processor(min_pixels, max_pixels)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = head_dim // 2
    # Contiguous temporal / height / width sections of the rotary frequencies (16/24/24 of 64 for 7B).
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=TINY_MAX_POSITIONS,
            initializer_range=init_std,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
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
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.eos_token_id = ids["<|im_end|>"]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = ids["<|endoftext|>"]
    gen.do_sample = False
    return model, processor
