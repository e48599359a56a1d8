"""A tiny random Qwen2.5-VL and an offline processor, built in seconds on CPU with nothing downloaded.

Tests, the README demo and CI use this pair wherever a real checkpoint would be too big or unavailable:

- the model is the stock `Qwen2_5_VLForConditionalGeneration` built from a small config (GQA text decoder, a
  two-block vision tower with window and full attention), randomly initialised from `seed`;
- the tokenizer is Qwen's own class (`Qwen2Tokenizer`: byte-level BPE with Qwen's pre-tokenizer) with a
  vocabulary trained on the spot from a built-in corpus, carrying Qwen2.5-VL's special tokens, whose ids are
  wired into the model config;
- the chat template renders Qwen2.5-VL's format (default system prompt when the first message is not a
  system message, `<|vision_start|><|image_pad|><|vision_end|>` per image);
- the image processor is the real Qwen2-VL one with small min/max pixel budgets, so an image becomes a handful
  of visual tokens (4 to 16).
"""

from __future__ import annotations

import random
from typing import List, Tuple

import torch

from avar_ops.analysis.tiny_common import (
    ROLES,
    SENTENCES,
    SYMBOLS,
    TINY_MAX_POSITIONS,
    build_model,
    qwen2_tokenizer,
    qwen2_vl_image_processor,
    qwen2_vl_text_config,
    qwen_ids,
    qwen_vision_ids,
    video_processor_class,
    vision_config,
)

__all__ = [
    "build_tiny_qwen2_5_vl",
    "build_tiny_processor",
    "synthetic_images",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "TINY_MAX_POSITIONS",
]

# Qwen2.5-VL's special tokens, in the order the real vocabulary numbers them (151643 onwards).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's chat format. Content is a string or a list of {"type": "image"|"video"|"text", ...} parts.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small corpus for the BPE: chat roles, the default system prompt and the kind of questions the demo asks.
_CORPUS = [
    *ROLES,
    DEFAULT_SYSTEM_PROMPT,
    *SENTENCES,
    "Picture 1: Picture 2: Video 1: yes no left right top bottom large small one two three four five",
    SYMBOLS,
]


def build_tiny_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """Qwen2.5-VL processor with a freshly trained tokenizer and small image budgets.

    With the defaults an image becomes 4 (56×56 pixels) to 16 (112×112) visual tokens.
    """
    from transformers import Qwen2_5_VLProcessor

    # The trained vocabulary (bytes, merges and the special tokens) has 512 ids; the embedding matches it.
    tokenizer = qwen2_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", corpus=_CORPUS)
    tokenizer.chat_template = CHAT_TEMPLATE
    video_cls = video_processor_class(
        "Qwen2VLVideoProcessor", who="build_tiny_processor", processor="Qwen2_5_VLProcessor"
    )
    video_processor = video_cls(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return Qwen2_5_VLProcessor(
        image_processor=qwen2_vl_image_processor(min_pixels, max_pixels, patch_size=14),
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen2_5_vl(
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
    """A randomly initialised Qwen2.5-VL (eval mode) and its offline processor.

    The text decoder has `num_layers` layers of `num_heads` query heads sharing `num_kv_heads` key/value heads
    (head_dim = hidden_size / num_heads); the vision tower has `vision_depth` blocks, the last one with full
    attention and the others windowed, as in the real model. Token ids in the config are the tokenizer's.
    Weights are drawn with std `init_std`: the checkpoint default (0.02) gives a tiny model whose logits are
    nearly flat and whose greedy output repeats one token; 0.1 gives peaked, input-dependent outputs.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = build_tiny_processor(min_pixels, max_pixels)
    tok = processor.tokenizer
    config = Qwen2_5_VLConfig(
        text_config=qwen2_vl_text_config(
            "build_tiny_qwen2_5_vl",
            tok,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            init_std=init_std,
        ),
        vision_config=vision_config(
            vision_depth,
            hidden_size,
            init_std,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        initializer_range=init_std,
        **qwen_vision_ids(tok),
        attn_implementation=attn_implementation,
    )
    model = build_model(Qwen2_5_VLForConditionalGeneration, config, seed=seed, dtype=dtype, **qwen_ids(tok))
    return model, processor


_COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30), (150, 60, 190), (20, 20, 20)]


def synthetic_images(n: int, seed: int = 0, sizes: Tuple[int, ...] = (56, 84, 112)) -> List["object"]:
    """`n` PIL RGB images of coloured shapes on a light background, reproducible from `seed`.

    Sides are drawn from `sizes` so that, with the tiny processor's budgets, images give different numbers of
    visual tokens (4, 9 or 16).
    """
    from PIL import Image, ImageDraw

    if n < 0:
        raise ValueError(f"synthetic_images: n must be >= 0, got {n}")
    rng = random.Random(seed)
    images = []
    for _ in range(n):
        w, h = rng.choice(sizes), rng.choice(sizes)
        img = Image.new("RGB", (w, h), (245, 245, 240))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randint(0, w - 12), rng.randint(0, h - 12)
            x1, y1 = rng.randint(x0 + 8, w), rng.randint(y0 + 8, h)
            colour = rng.choice(_COLOURS)
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
        images.append(img)
    return images
