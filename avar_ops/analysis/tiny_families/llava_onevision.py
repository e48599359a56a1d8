"""A tiny random LLaVA-OneVision and an offline processor, built in seconds on CPU with nothing downloaded.

- the model is the stock `LlavaOnevisionForConditionalGeneration`: a SigLIP vision tower, a two-layer projector
  and a Qwen2 language model, from a small config, randomly initialised from `seed`;
- the tokenizer is Qwen2's (`Qwen2Tokenizer`) with a vocabulary trained on the spot, carrying the special tokens
  of the llava-hf OneVision checkpoints in their order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then
  `<image>` and `<video>`, which are not written `<|…|>`);
- the chat template renders the checkpoints' layout: `<|im_start|>ROLE\\n`, the images of a turn first as
  `<image>\\n`, then its videos as `<video>\\n`, then its text, `<|im_end|>\\n`; no default system turn; like
  the published one it reads contents as lists of parts only (a plain string content renders to nothing);
- the image processor is the real OneVision one (AnyRes: a base view plus tiles picked from
  `image_grid_pinpoints`) with a 28-pixel tile, so a tile is 2 × 2 SigLIP patches; the processor expands each
  `<image>` into the base view's 4 tokens, the unpadded tile grid and one image-newline token per grid row, all
  written `<image>`: 8 to 24 visual tokens per image with the default pinpoints.
"""

from __future__ import annotations

from typing import Tuple

import torch

from avar_ops.analysis.tiny_common import (
    build_model,
    check_heads,
    decoder_config,
    image_processor_class,
    qwen2_tokenizer,
    qwen_ids,
    video_processor_class,
)

__all__ = ["build", "build_processor", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "TILE", "GRID_PINPOINTS"]

# llava-hf/llava-onevision-qwen2-*-hf number these 151643..151647.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# As in the published template: content is a list of {"type": "image"|"video"|"text", ...} parts (a plain string
# content renders to nothing, as there); a turn's images come first, then its videos, then its text, and the
# assistant's text is marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] }}{% endgeneration %}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TILE = 28  # side of the base view and of each AnyRes tile (the real checkpoints use 384)
PATCH = 14
# Tile grids of 1×1 to 2×2, 1×3 and 3×1 tiles (the real checkpoints go to 6×6 tiles of 384 pixels).
GRID_PINPOINTS = [[TILE * r, TILE * c] for r in (1, 2, 3) for c in (1, 2, 3) if r * c <= 4]


def build_processor(grid_pinpoints=None):
    """LLaVA-OneVision processor with a freshly trained Qwen2 tokenizer and 28-pixel AnyRes tiles."""
    from transformers import LlavaOnevisionProcessor

    image_cls = image_processor_class("LlavaOnevisionImageProcessor")
    video_cls = video_processor_class(
        "LlavaOnevisionVideoProcessor", who="llava_onevision.build_processor", processor="LlavaOnevisionProcessor"
    )
    tokenizer = qwen2_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    pinpoints = [list(p) for p in (grid_pinpoints or GRID_PINPOINTS)]
    size = {"height": TILE, "width": TILE}
    return LlavaOnevisionProcessor(
        image_processor=image_cls(size=size, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
        video_processor=video_cls(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
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
    grid_pinpoints=None,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised LLaVA-OneVision (eval mode) and its offline processor.

    The Qwen2 decoder has `num_layers` layers of `num_heads` query heads sharing `num_kv_heads` key/value heads;
    the SigLIP tower has `vision_depth` layers on 28-pixel views. Weights are drawn with std `init_std` (0.1 gives
    peaked, input-dependent greedy outputs, see `tiny_qwen`); the image-newline vector is drawn with it too.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    check_heads("llava_onevision.build", hidden_size, num_heads, num_kv_heads)
    processor = build_processor(grid_pinpoints)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlavaOnevisionConfig(
        text_config=decoder_config(
            tok,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            init_std=init_std,
            model_type="qwen2",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            **qwen_ids(tok),
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_depth,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=PATCH,
            vision_use_head=False,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[list(p) for p in (grid_pinpoints or GRID_PINPOINTS)],
        vision_aspect_ratio="anyres_max_9",
        attn_implementation=attn_implementation,
    )
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    config.initializer_range = init_std

    def init(model):
        with torch.no_grad():  # the class scales image_newline by 1/sqrt(hidden), far below the other weights
            model.model.image_newline.normal_(0.0, init_std)

    model = build_model(
        LlavaOnevisionForConditionalGeneration, config, seed=seed, dtype=dtype, init=init, **qwen_ids(tok)
    )
    return model, processor
