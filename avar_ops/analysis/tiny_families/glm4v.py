"""Tiny random GLM-4.1V (`Glm4vForConditionalGeneration`) and GLM-4.5V (`Glm4vMoeForConditionalGeneration`),
each with an offline processor, built in seconds on CPU with nothing downloaded.

- The models are the stock transformers classes from small configs: a GQA text decoder with GLM's 3D RoPE
  (temporal / height / width sections over the rotated half of each head, `partial_rotary_factor` 0.5 as in the
  checkpoints), its four RMS norms per layer, a two-block vision tower with the downsampling convolution and the
  patch merger; GLM-4.5V's decoder has a dense first layer and routed plus shared experts after it.
- The tokenizer is a byte-level BPE trained on the spot with GLM-4's pre-tokenizer (the cl100k-style split
  pattern, digits in runs of up to three), wrapped as transformers' generic fast tokenizer as the checkpoints
  are. It carries GLM's special tokens in the checkpoints' order (`<|endoftext|>`, `[MASK]`, `[gMASK]`,
  `[sMASK]`, `<sop>`, `<eop>`, the four role tokens, the image / video begin and end markers, `<|image|>`,
  `<|video|>`), and `<think>`, `</think>`, `<answer>`, `</answer>`, `<|begin_of_box|>`, `<|end_of_box|>` as
  single, non-special tokens. Ids are the tokenizer's own, wired into the model configs.
- The chat templates render GLM's layouts. GLM-4.1V: `[gMASK]<sop>`, then per message `<|system|>\\n`,
  `<|user|>\\n` or `<|assistant|>\\n` and the content, with no token closing a turn (a turn runs to the next role
  token), images as `<|begin_of_image|><|image|><|end_of_image|>`, videos as
  `<|begin_of_video|><|video|><|end_of_video|>`, and `<|assistant|>\\n` as the generation prompt. GLM-4.5V: the
  same markers, an assistant turn written `<|assistant|>` + `\\n<think>…</think>` (empty for turns before the
  last user turn) + `\\n` + the stripped answer, `/nothink` appended to user turns and an empty think block to
  the generation prompt when `enable_thinking=False`, and `<|assistant|>` alone as the generation prompt.
  One deliberate difference: every role here takes a string or a list of parts, while the published GLM-4.1V
  template reads parts only in user turns and prints a system or assistant content list as its Python repr
  (`<|system|>\n[{'type': 'text', …}]`); avar builds such lists, so with the real GLM-4.1V template those turns
  need string content. For string content both render the same text.
- The image and video processors are the real GLM-4.1V ones with small pixel budgets, so an image becomes 4
  (56×56 pixels) to 16 (112×112) visual tokens; the processor expands a video into one
  `<|begin_of_image|><|image|>…<|end_of_image|>` block per two frames, each followed by its timestamp.

What ends a response: the checkpoints' generation configs stop on `<|endoftext|>`, `<|user|>` and
`<|observation|>`; the tiny models' generation configs carry the same three ids.
"""

from __future__ import annotations

from typing import Tuple

import torch

from avar_ops.analysis.tiny_common import (
    ROLES,
    SENTENCES,
    TINY_MAX_POSITIONS,
    build_model,
    check_heads,
    check_token_ids,
    decoder_config,
    image_processor_class,
    train_byte_level_bpe,
    video_processor_class,
    vision_config,
)

__all__ = [
    "build",
    "build_moe",
    "build_processor",
    "SPECIAL_TOKENS",
    "EXTRA_TOKENS",
    "EOS_TOKENS",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_45V",
    "TINY_MAX_POSITIONS",
]

# GLM-4's special tokens in the order the checkpoints number them (151329 onwards), then GLM-4.1V's image and
# video placeholders (151343 / 151344 there, the Glm4vConfig defaults).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
]
# Reasoning and answer-box markers: one token each, but not special (decoding with skip_special_tokens keeps them).
EXTRA_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>"]
# The tokens the checkpoints' generation_config.json stops on.
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# Content is a string or a list of {"type": "image"|"video"|"text", ...} parts; an image or video part renders its
# markers wherever it stands among the text parts. Written for this module; it renders GLM-4.1V's layout
# (whitespace control strips the template's own line breaks, as the published template's does under
# transformers' trim_blocks / lstrip_blocks).
_CONTENT = (
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}"
    "{%- elif part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)

CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}" + _CONTENT + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)

# GLM-4.5V: the assistant turn carries its think block; the reasoning of turns before the last user turn is
# dropped. Reasoning comes from `reasoning_content` or from a `<think>…</think>` prefix of the content.
CHAT_TEMPLATE_45V = (
    "[gMASK]<sop>"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'user' -%}<|user|>{{ '\\n' }}" + _CONTENT + ""
    "{%- if enable_thinking is defined and not enable_thinking -%}/nothink{%- endif -%}"
    "{%- elif message['role'] == 'system' -%}<|system|>{{ '\\n' }}" + _CONTENT + ""
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if content is string -%}{%- set text = content -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for part in content -%}{%- if part is string -%}{%- set text.v = text.v + part -%}"
    "{%- elif 'text' in part -%}{%- set text.v = text.v + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set text = text.v -%}{%- endif -%}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string else '' -%}"
    "{%- if not reasoning and '</think>' in text -%}"
    "{%- set reasoning = text.split('</think>')[0].split('<think>')[-1].strip() -%}"
    "{%- set text = text.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "<|assistant|>"
    "{%- if loop.index0 > ns.last_user and reasoning -%}{{ '\\n<think>' + reasoning.strip() + '</think>' }}"
    "{%- else -%}{{ '\\n<think></think>' }}{%- endif -%}"
    "{%- if text.strip() -%}{{ '\\n' + text.strip() }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '\\n<think></think>' }}{%- endif -%}"
    "{%- endif -%}"
)

# GLM-4's split pattern (cl100k-style: contractions, letters with one leading non-letter, digits in runs of up
# to three, punctuation runs, newlines, other whitespace).
_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Small corpus for the BPE: roles, the demo's kind of questions and GLM-style reasoning answers.
_CORPUS = [
    *ROLES,
    "You are a helpful assistant.",
    *SENTENCES[:4],
    "<think>Let me look back at the image to check my answer.</think><answer>The answer is 3.</answer>",
    *SENTENCES[5:],
    "What happens in the video? The ball rolls from left to right. /nothink",
    "yes no left right top bottom large small one two three four five",
    "0 1 2 3 4 5 6 7 8 9 10 12 24 100 + - * / = ( ) . , ; : ? !",
]

_VOCAB_SIZE = 600  # trained vocabulary (bytes, merges and the special tokens); the embedding matches it


def _train_tokenizer(chat_template: str):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    # GLM-4's tokenizer.json: no normaliser, the split pattern, then byte-level without its own regex.
    backend = train_byte_level_bpe(
        _CORPUS,
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        split_pattern=_PRETOKENIZE,
        vocab_size=_VOCAB_SIZE,
        nfc=False,
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    vocab = backend.get_vocab()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_MAX_POSITIONS,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>",)],
    )
    tokenizer.chat_template = chat_template
    check_token_ids("glm4v", tokenizer, vocab, SPECIAL_TOKENS)
    for tok in EXTRA_TOKENS:
        if len(tokenizer.encode(tok, add_special_tokens=False)) != 1:
            raise RuntimeError(f"{tok} is not one token")
    return tokenizer


def build_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, *, chat_template: str = CHAT_TEMPLATE):
    """GLM-4.1V processor (`Glm4vProcessor`) with a freshly trained tokenizer and small image budgets.

    Budgets are per image (GLM's resize compares them with two frames' worth of pixels, so they are doubled
    for its processors). `chat_template` is `CHAT_TEMPLATE` (GLM-4.1V) or `CHAT_TEMPLATE_45V` (GLM-4.5V).
    """
    from transformers import Glm4vProcessor

    image_cls = image_processor_class("Glm4vImageProcessor")
    video_cls = video_processor_class("Glm4vVideoProcessor", who="glm4v.build_processor", processor="Glm4vProcessor")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(
            f"glm4v.build_processor: need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
            f"max_pixels={max_pixels}"
        )
    size = {"shortest_edge": 2 * min_pixels, "longest_edge": 2 * max_pixels}
    image_processor = image_cls(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = video_cls(
        size=size, max_image_size={"longest_edge": 2 * max_pixels}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    tokenizer = _train_tokenizer(chat_template)
    return Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def _check_shape(fn: str, hidden_size: int, num_heads: int, num_kv_heads: int) -> int:
    head_dim = check_heads(fn, hidden_size, num_heads, num_kv_heads)
    if head_dim % 8:
        raise ValueError(f"{fn}: head_dim = {head_dim} must be a multiple of 8 (half of it is rotated, in pairs)")
    return head_dim


def _rope(head_dim: int) -> dict:
    # Half of each head is rotated (partial_rotary_factor 0.5); its frequencies are split into temporal, height
    # and width sections in the checkpoints' proportions (8 / 12 / 12 of 32).
    freqs = head_dim // 4
    t = freqs // 4
    h = (freqs - t) // 2
    return {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [t, h, freqs - t - h],
    }


def _vision_config(vision_depth: int, hidden_size: int, init_std: float) -> dict:
    return vision_config(vision_depth, hidden_size, init_std, patch_size=14, image_size=112)


def _ids(tok) -> dict:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _build_model(model_cls, config, seed: int, dtype: torch.dtype, ids: dict):
    eos = [ids[t] for t in EOS_TOKENS]
    return build_model(
        model_cls,
        config,
        seed=seed,
        dtype=dtype,
        eos_token_id=eos,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
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
    """A randomly initialised GLM-4.1V (`Glm4vForConditionalGeneration`, eval mode) and its offline processor.

    `num_layers` decoder layers of `num_heads` query heads sharing `num_kv_heads` key/value heads (head_dim =
    hidden_size / num_heads, a multiple of 8); `vision_depth` vision blocks. Weights are drawn with std
    `init_std` (0.1: peaked, input-dependent greedy outputs; the checkpoint default 0.02 gives near-flat logits).
    """
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    head_dim = _check_shape("glm4v.build", hidden_size, num_heads, num_kv_heads)
    processor = build_processor(min_pixels, max_pixels)
    ids = _ids(processor.tokenizer)
    config = Glm4vConfig(
        text_config=decoder_config(
            processor.tokenizer,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            init_std=init_std,
            rope_parameters=_rope(head_dim),
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=_vision_config(vision_depth, hidden_size, init_std),
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        initializer_range=init_std,
        attn_implementation=attn_implementation,
    )
    return _build_model(Glm4vForConditionalGeneration, config, seed, dtype, ids), processor


def build_moe(
    seed: int = 0,
    *,
    num_layers: int = 3,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 4,
    experts_per_token: int = 2,
    vision_depth: int = 2,
    init_std: float = 0.1,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised GLM-4.5V (`Glm4vMoeForConditionalGeneration`, eval mode) and its offline processor
    (GLM-4.5V's chat template). Layer 0 is dense, the others route each token to `experts_per_token` of
    `num_experts` experts plus one shared expert; attention is as in `build`."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    head_dim = _check_shape("glm4v.build_moe", hidden_size, num_heads, num_kv_heads)
    if not 0 < experts_per_token <= num_experts:
        raise ValueError(
            f"glm4v.build_moe: need 0 < experts_per_token <= num_experts, got experts_per_token={experts_per_token}, "
            f"num_experts={num_experts}"
        )
    processor = build_processor(min_pixels, max_pixels, chat_template=CHAT_TEMPLATE_45V)
    ids = _ids(processor.tokenizer)
    config = Glm4vMoeConfig(
        text_config=decoder_config(
            processor.tokenizer,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            init_std=init_std,
            moe_intermediate_size=hidden_size // 2,
            head_dim=head_dim,
            n_routed_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            n_shared_experts=1,
            first_k_dense_replace=1,
            rope_parameters=_rope(head_dim),
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids[t] for t in EOS_TOKENS],
        ),
        vision_config=_vision_config(vision_depth, hidden_size, init_std),
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        initializer_range=init_std,
        attn_implementation=attn_implementation,
    )
    return _build_model(Glm4vMoeForConditionalGeneration, config, seed, dtype, ids), processor
