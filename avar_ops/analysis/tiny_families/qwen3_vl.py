"""A tiny random Qwen3-VL (dense) and its offline processor, built in seconds on CPU with nothing downloaded.

What makes Qwen3-VL differ from Qwen2.5-VL, and what the tiny pair keeps of it:

- the text decoder is Qwen3's (q/k RMS norms, explicit head_dim) with *interleaved* MRoPE: the temporal,
  height and width position ids rotate interleaved frequency lanes (`mrope_section` of the half head dim,
  [24, 20, 20] of 64 in the real model, [6, 5, 5] of 16 here);
- DeepStack: the vision tower hands out, besides its final merged features, one merged feature map per block
  listed in `deepstack_visual_indexes`; the text model adds the k-th of them to the hidden states at the
  image / video positions right after decoder layer k. Attention is untouched by it, only what the later
  layers' queries and keys are computed from;
- the chat template is Qwen3-VL's (Instruct): no default system prompt (a system turn appears only when the
  first message is one), `<|vision_start|><|image_pad|><|vision_end|>` per image and
  `<|vision_start|><|video_pad|><|vision_end|>` per video;
- video frames are tied to time by text, not by the temporal rotary id: the processor expands a video's pad
  into, per temporal patch (2 frames), `<T seconds>` (plain text, the mean time of the two frames) followed by
  `<|vision_start|>` + the frame's pads + `<|vision_end|>`. The timestamps tokenize as ordinary text inside the
  user turn; `avar_ops.hf.token_groups` therefore puts them in the user-text group (3), like any text the user
  turn holds (see docs/design.md §2);
- the image processor is the real Qwen2-VL one with Qwen3-VL's 16-pixel patches (32-pixel merged tokens) and
  small pixel budgets, so an image is 4 (64×64) to 16 (128×128) visual tokens; the video processor is the
  real `Qwen3VLVideoProcessor` with budgets that keep a short clip at 64×64 pixels per frame.

The tokenizer is the one `avar_ops.analysis.tiny_qwen` trains (Qwen2Tokenizer, Qwen's special tokens, which
Qwen3-VL shares id for id), with Qwen3's added plain-text tokens (`<think>`, `<tool_call>`, ...) and this
module's chat template.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from avar_ops.analysis.tiny_common import (
    build_model,
    check_heads,
    decoder_config,
    qwen2_vl_image_processor,
    qwen_ids,
    qwen_vision_ids,
    vision_config,
)
from avar_ops.analysis.tiny_qwen import build_tiny_processor

__all__ = ["build", "build_processor", "build_config", "tiny_video", "CHAT_TEMPLATE", "ADDED_TOKENS"]

# Qwen3's tokens that are in the vocabulary but not special: they tokenize as one id and decode as text.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen3-VL Instruct's chat layout, written for the tiny tokenizer: a system turn only when the first message is
# a system message (its content a string or text parts), user turns with image / video / text parts,
# assistant turns with text, and the generation prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if message['role'] == 'user' and (content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content) %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif message['role'] == 'user' and (content['type'] == 'video' or 'video' in content) %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH_SIZE = 16  # Qwen3-VL's vision patch side (Qwen2/2.5-VL: 14)
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2


def _image_processor(min_pixels: int, max_pixels: int):
    return qwen2_vl_image_processor(
        min_pixels,
        max_pixels,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _video_processor(frame_pixels: int, max_frames: int):
    from transformers import Qwen3VLVideoProcessor

    # The budgets count pixels over all frames of a clip: a clip of up to `max_frames` frames keeps about
    # `frame_pixels` per frame.
    return Qwen3VLVideoProcessor(
        size={"shortest_edge": 32 * 32 * TEMPORAL_PATCH_SIZE, "longest_edge": frame_pixels * max_frames},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_frames=2,
        max_frames=max_frames,
        fps=2,
        cap_pixels_per_frame=False,
    )


def build_processor(
    min_pixels: int = 64 * 64, max_pixels: int = 128 * 128, *, video_frame_pixels: int = 64 * 64, max_frames: int = 8
):
    """Qwen3-VL processor with the tiny tokenizer, Qwen3-VL's chat template and small image / video budgets."""
    from transformers import Qwen3VLProcessor

    tokenizer = build_tiny_processor().tokenizer
    tokenizer.add_tokens(ADDED_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return Qwen3VLProcessor(
        image_processor=_image_processor(min_pixels, max_pixels),
        tokenizer=tokenizer,
        video_processor=_video_processor(video_frame_pixels, max_frames),
        chat_template=CHAT_TEMPLATE,
    )


def _check_sizes(name: str, hidden_size: int, num_heads: int, num_kv_heads: int) -> int:
    head_dim = check_heads(name, hidden_size, num_heads, num_kv_heads)
    if head_dim % 2 or head_dim < 16:
        raise ValueError(f"{name}: head_dim = hidden_size / num_heads must be even and >= 16, got {head_dim}")
    return head_dim


def _mrope_section(head_dim: int) -> list:
    """Interleaved MRoPE lanes (temporal, height, width) of the half head dim; 64 -> [24, 20, 20]."""
    half = head_dim // 2
    hw = (half * 5) // 16
    return [half - 2 * hw, hw, hw]


def build_config(
    processor,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    vision_depth: int,
    deepstack_layers: Optional[Sequence[int]],
    init_std: float,
    attn_implementation: str,
    moe: dict = None,
):
    """The tiny Qwen3-VL (or, with `moe`, Qwen3-VL-MoE) config whose token ids are the processor's."""
    name = "tiny qwen3_vl_moe" if moe else "tiny qwen3_vl"
    head_dim = _check_sizes(name, hidden_size, num_heads, num_kv_heads)
    if deepstack_layers is None:  # every vision block, as many as there are decoder layers to take them
        deepstack_layers = range(min(vision_depth, num_layers))
    deepstack = [int(i) for i in deepstack_layers]
    if any(i < 0 or i >= vision_depth for i in deepstack) or len(set(deepstack)) != len(deepstack):
        raise ValueError(
            f"{name}: deepstack_layers must be distinct vision block indices in [0, {vision_depth}), got {deepstack}"
        )
    if len(deepstack) > num_layers:
        raise ValueError(
            f"{name}: {len(deepstack)} DeepStack feature maps need at least as many decoder layers, got {num_layers}"
        )
    tok = processor.tokenizer
    text = decoder_config(
        tok,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        init_std=init_std,
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(head_dim),
            "mrope_interleaved": True,
        },
        **qwen_ids(tok),
    )
    if moe:
        text.update(moe)
    vision = vision_config(
        vision_depth,
        hidden_size,
        init_std,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        num_position_embeddings=64,  # an 8×8 learned grid, resampled to each image's patch grid
        deepstack_visual_indexes=deepstack,
    )
    common = dict(
        text_config=text,
        vision_config=vision,
        **qwen_vision_ids(tok),
        attn_implementation=attn_implementation,
    )
    if moe:
        from transformers import Qwen3VLMoeConfig

        return Qwen3VLMoeConfig(**common)
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**common)


def build(
    seed: int = 0,
    *,
    num_layers: int = 3,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    deepstack_layers: Optional[Sequence[int]] = None,
    init_std: float = 0.1,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    min_pixels: int = 64 * 64,
    max_pixels: int = 128 * 128,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised `Qwen3VLForConditionalGeneration` (eval mode) and its offline processor.

    `deepstack_layers` are the vision blocks whose features DeepStack adds into decoder layers 0, 1, ...
    (one decoder layer per listed block); the default takes every vision block (as many as there are decoder
    layers), `()` turns DeepStack off. Weights are drawn with std `init_std`
    (0.1: peaked, input-dependent greedy outputs; the checkpoint default 0.02 gives near-flat logits).
    """
    from transformers import Qwen3VLForConditionalGeneration

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
    )
    model = build_model(
        Qwen3VLForConditionalGeneration, config, seed=seed, dtype=dtype, **qwen_ids(processor.tokenizer)
    )
    return model, processor


def tiny_video(num_frames: int = 4, seed: int = 0, side: int = 64):
    """A clip of `num_frames` RGB frames [T, H, W, 3] uint8 (numpy) of moving shapes, and its metadata dict.

    The metadata says 2 frames per second, so the tiny video processor (which samples 2 per second) keeps every
    frame; each temporal patch (2 frames) is stamped with its frames' mean time: 0.25 s, 1.25 s, ..., which the
    processor prints with one decimal (`<0.2 seconds>`, `<1.2 seconds>`, ...).
    """
    import numpy as np

    from avar_ops.analysis.tiny_qwen import synthetic_images

    if num_frames < 2:
        raise ValueError(f"tiny_video: num_frames must be >= 2 (one temporal patch), got {num_frames}")
    frames = [np.asarray(img.resize((side, side))) for img in synthetic_images(num_frames, seed=seed)]
    video = np.stack(frames)  # [T, H, W, 3]
    metadata = {"fps": 2.0, "total_num_frames": num_frames, "duration": num_frames / 2.0}
    return video, metadata
