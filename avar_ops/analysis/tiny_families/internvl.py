"""A tiny random InternVL (transformers' native class) and an offline processor, built in seconds on CPU.

- the model is the stock `InternVLForConditionalGeneration`: an InternViT vision tower, pixel-shuffle
  downsampling, a projector and a Qwen2 (InternVL3) or Qwen3 (InternVL3.5) language model, from a small config,
  randomly initialised from `seed`;
- the tokenizer is Qwen2's class with a vocabulary trained on the spot, carrying Qwen's special tokens (Qwen3's
  `<think>` / `</think>` too for the Qwen3 backbone) and then InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`,
  `<quad>`, `</quad>`, `<ref>`, `</ref>`, `<box>`, `</box>` and `<video>`, in the order the OpenGVLab `-hf`
  checkpoints number them, with the named attributes the processor reads (`start_image_token`,
  `end_image_token`, `context_image_token`, `video_token`);
- the chat template renders the `-hf` checkpoints' layout: `<|im_start|>ROLE\\n`, an image part as
  `<IMG_CONTEXT>\\n`, a video part as `<video>\\n`, text, `<|im_end|>\\n`; no default system turn. The processor
  then writes each image as `<img>` + `<IMG_CONTEXT>` × (4 per tile) + `</img>`, and a video as one
  `FrameN: <img>…</img>` line per frame;
- the image processor is the real one (GotOcr2's, cropping to 56-pixel tiles plus a thumbnail, at most 4
  tiles), so an image is 4 to 20 `<IMG_CONTEXT>` tokens.
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
from avar_ops.analysis.tiny_qwen import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

__all__ = ["build", "build_processor", "special_tokens", "CHAT_TEMPLATE", "INTERNVL_TOKENS", "TILE", "BACKBONES"]

# InternVL's own tokens, after the language model's; `<video>` is added last by the -hf conversion.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
BACKBONES = ("qwen2", "qwen3")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TILE = 56  # side of a tile (the real checkpoints use 448)
PATCH = 14
DOWNSAMPLE = 0.5
TOKENS_PER_TILE = int((TILE // PATCH) ** 2 * DOWNSAMPLE**2)  # 4


def special_tokens(backbone: str = "qwen2"):
    """The special tokens of the tiny InternVL tokenizer for `backbone`, in id order."""
    if backbone not in BACKBONES:
        raise ValueError(f"internvl: backbone must be one of {BACKBONES}, got {backbone!r}")
    base = list(QWEN_SPECIAL_TOKENS)
    if backbone == "qwen3":
        base += ["<think>", "</think>"]
    return base + INTERNVL_TOKENS + ["<video>"]


def build_processor(backbone: str = "qwen2", max_patches: int = 4):
    """InternVL processor with a freshly trained Qwen tokenizer and 56-pixel tiles (4 tokens each)."""
    from transformers import InternVLProcessor

    image_cls = image_processor_class("GotOcr2ImageProcessor")
    video_cls = video_processor_class(
        "InternVLVideoProcessor", who="internvl.build_processor", processor="InternVLProcessor"
    )
    tokenizer = qwen2_tokenizer(
        special_tokens(backbone), eos_token="<|im_end|>", pad_token="<|endoftext|>", named_tokens=NAMED_TOKENS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    size = {"height": TILE, "width": TILE}
    image_processor = image_cls(
        size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_cls(size=size),
        image_seq_length=TOKENS_PER_TILE,
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
    backbone: str = "qwen2",
    max_patches: int = 4,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised InternVL (eval mode) and its offline processor.

    `backbone` picks the language model ("qwen2": InternVL3; "qwen3": InternVL3.5, with per-head q/k norms);
    it has `num_layers` layers of `num_heads` query heads sharing `num_kv_heads` key/value heads. The vision
    tower has `vision_depth` layers on 56-pixel tiles. Weights are drawn with std `init_std` (see `tiny_qwen`).
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    head_dim = check_heads("internvl.build", hidden_size, num_heads, num_kv_heads)
    processor = build_processor(backbone, max_patches)
    tok = processor.tokenizer
    text_config = decoder_config(
        tok,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        init_std=init_std,
        model_type=backbone,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        **qwen_ids(tok),
    )
    config = InternVLConfig(
        text_config=text_config,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_depth,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=PATCH,
            initializer_range=init_std,
        ),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    config.initializer_range = init_std
    model = build_model(InternVLForConditionalGeneration, config, seed=seed, dtype=dtype, **qwen_ids(tok))
    return model, processor
