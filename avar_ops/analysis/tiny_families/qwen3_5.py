"""A tiny random Qwen3.5 (hybrid Gated DeltaNet / full-attention decoder) and an offline processor.

Built in seconds on CPU with nothing downloaded, for the family tests and `avar demo --family qwen3_5`:

- the model is the stock `Qwen3_5ForConditionalGeneration` (or `Qwen3_5MoeForConditionalGeneration` with
  `moe=True`) from a small config: a text decoder whose layers alternate between linear attention (Gated
  DeltaNet, run by transformers' own torch code on CPU) and gated full attention (GQA, q/k norms, partial
  interleaved MRoPE), and a two-block vision tower; randomly initialised from `seed`;
- the tokenizer is Qwen3.5's own class (`Qwen3_5Tokenizer`: byte-level BPE with its pre-tokenizer, which
  splits digits one by one) with a vocabulary trained on the spot, carrying Qwen3.5's added tokens in the
  order the real vocabulary numbers them (`<|endoftext|>` 248044 … `</think>` 248069): the ChatML and vision
  markers as special tokens, the tool-call and `<think>` / `</think>` tokens as plain added tokens, as
  published;
- the chat template renders Qwen3.5's layout: no default system turn; contents trimmed; an image as
  `<|vision_start|><|image_pad|><|vision_end|>`; assistant turns after the last user turn carry a
  `<think>\\n … \\n</think>\\n\\n` block (empty when there is no reasoning), earlier ones only their answer;
  the generation prompt opens a think block (`<|im_start|>assistant\\n<think>\\n`), or with
  `enable_thinking=False` closes an empty one;
- the processor is transformers' `Qwen3VLProcessor` with the real Qwen2-VL image processor and the Qwen3-VL
  video processor (patch 16, merge 2) at small pixel budgets, so an image becomes 4 to 16 visual tokens.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from avar_ops.analysis.tiny_common import (
    ROLES,
    SENTENCES,
    SYMBOLS,
    bpe_tokenizer,
    build_model,
    check_token_ids,
    decoder_config,
    qwen2_vl_image_processor,
    qwen_vision_ids,
    train_byte_level_bpe,
    video_processor_class,
    vision_config,
)

__all__ = ["build", "build_processor", "SPECIAL_TOKENS", "ADDED_TOKENS", "CHAT_TEMPLATE", "layer_types"]

# Qwen3.5's added tokens in the order the real vocabulary numbers them (248044 onwards), with whether the
# published tokenizer marks them special. `<think>` / `</think>` and the tool tokens are not special there:
# decoding with skip_special_tokens keeps them.
ADDED_TOKENS: List[Tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
SPECIAL_TOKENS = [tok for tok, special in ADDED_TOKENS if special]

# Qwen3.5's chat layout, written for the tiny model (system, user and assistant turns; images and videos;
# reasoning as `reasoning_content` or inside the content before `</think>`; add_generation_prompt,
# enable_thinking, add_vision_id). Tools are not rendered.
CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0, last_user=-1) %}"
    "{%- macro body(content, is_system) %}"
    "{%- if content is string %}{{- content }}"
    "{%- elif content is iterable and content is not mapping %}"
    "{%- for part in content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{%- if is_system %}{{- raise_exception('A system turn cannot hold an image.') }}{%- endif %}"
    "{%- set counts.image = counts.image + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ counts.image ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' or 'video' in part %}"
    "{%- if is_system %}{{- raise_exception('A system turn cannot hold a video.') }}{%- endif %}"
    "{%- set counts.video = counts.video + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ counts.video ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}"
    "{%- else %}{{- raise_exception('Unknown content part.') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- elif content is not none and content is defined %}"
    "{{- raise_exception('Content must be a string or a list of parts.') }}"
    "{%- endif %}"
    "{%- endmacro %}"
    "{%- if not messages %}{{- raise_exception('No messages.') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{%- set counts.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- raise_exception('The system turn must come first.') }}{%- endif %}"
    "{{- '<|im_start|>system\\n' + body(message.content, true) | trim + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + body(message.content, false) | trim + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set answer = body(message.content, false) | trim %}"
    "{%- set thought = '' %}"
    "{%- if message.reasoning_content is string %}{%- set thought = message.reasoning_content %}"
    "{%- elif '</think>' in answer %}"
    "{%- set thought = answer.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set answer = answer.split('</think>')[-1] | trim %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > counts.last_user %}"
    "{{- '<think>\\n' + thought | trim + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- answer + '<|im_end|>\\n' }}"
    "{%- else %}{{- raise_exception('Unknown role ' ~ message.role ~ '.') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Small corpus for the BPE: chat roles, think markers and the kind of questions the demo asks.
_CORPUS = [
    *ROLES,
    *SENTENCES,
    "Picture 1: Picture 2: Video 1: yes no left right top bottom large small one two three four five",
    "<0.5 seconds> <1.5 seconds> <2.5 seconds>",
    SYMBOLS,
]

_VOCAB_SIZE = 512  # trained vocabulary (bytes, merges and the added tokens); the embedding matches it
_PATCH, _MERGE, _TEMPORAL = 16, 2, 2  # Qwen3.5's vision patching


def _train_tokenizer():
    from tokenizers import AddedToken
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

    backend = train_byte_level_bpe(
        _CORPUS,
        [tok for tok, _ in ADDED_TOKENS],  # ids 0.. in the published order
        split_pattern=PRETOKENIZE_REGEX,
        vocab_size=_VOCAB_SIZE,
    )
    tokenizer, vocab = bpe_tokenizer(
        Qwen3_5Tokenizer,
        backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
        model_max_length=262144,
    )
    # The non-special added tokens keep their trained ids; registering them keeps them whole when encoding.
    tokenizer.add_tokens(
        [AddedToken(tok, special=False, normalized=False) for tok, special in ADDED_TOKENS if not special]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    check_token_ids("qwen3_5", tokenizer, vocab, [tok for tok, _ in ADDED_TOKENS])
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, the trained vocabulary {len(vocab)}")
    return tokenizer


def build_processor(min_pixels: int = 64 * 64, max_pixels: int = 128 * 128):
    """Qwen3.5's processor (`Qwen3VLProcessor`) with a freshly trained tokenizer and small pixel budgets.

    With the defaults an image becomes 4 (64×64 pixels) to 16 (128×128) visual tokens.
    """
    from transformers import Qwen3VLProcessor

    tokenizer = _train_tokenizer()
    video_cls = video_processor_class(
        "Qwen3VLVideoProcessor", who="the tiny Qwen3.5 processor", processor="Qwen3VLProcessor"
    )
    # Qwen3.5 normalises pixels to [-1, 1] (mean = std = 0.5), unlike Qwen2-VL's CLIP statistics.
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = qwen2_vl_image_processor(
        min_pixels, max_pixels, patch_size=_PATCH, merge_size=_MERGE, temporal_patch_size=_TEMPORAL, **norm
    )
    video_processor = video_cls(
        size={"shortest_edge": min_pixels, "longest_edge": 4 * max_pixels},
        patch_size=_PATCH,
        temporal_patch_size=_TEMPORAL,
        merge_size=_MERGE,
        min_frames=2,
        max_frames=4,
        cap_pixels_per_frame=True,
        **norm,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def layer_types(num_layers: int, full_attention_interval: int) -> List[str]:
    """Qwen3.5's layer pattern: every `full_attention_interval`-th decoder layer has softmax attention."""
    return [
        "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention" for i in range(num_layers)
    ]


def build(
    seed: int = 0,
    *,
    num_layers: int = 4,
    full_attention_interval: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    vision_depth: int = 2,
    moe: bool = False,
    init_std: float = 0.1,
    min_pixels: int = 64 * 64,
    max_pixels: int = 128 * 128,
) -> Tuple[torch.nn.Module, object]:
    """A randomly initialised Qwen3.5 (eval mode) and its offline processor.

    The decoder has `num_layers` layers, every `full_attention_interval`-th one (counting from 1) with gated
    softmax attention of `num_heads` query heads over `num_kv_heads` key/value heads of size `head_dim`, the
    others Gated DeltaNet linear attention; so the defaults give decoder layers 1 and 3 softmax attention.
    `moe=True` builds the mixture-of-experts variant (4 experts, 2 per token, a shared expert), whose
    attention is the same. Weights are drawn with std `init_std` (0.1: peaked, input-dependent greedy
    outputs; the checkpoint default 0.02 gives near-flat logits in a model this small).
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    if num_layers < 1 or full_attention_interval < 1 or num_layers < full_attention_interval:
        raise ValueError(
            f"qwen3_5.build: need num_layers >= full_attention_interval >= 1 (at least one attention layer), got "
            f"num_layers={num_layers}, full_attention_interval={full_attention_interval}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"qwen3_5.build: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    rotary = head_dim // 4  # Qwen3.5 rotates a quarter of each head (partial_rotary_factor 0.25)
    if rotary % 2 or rotary < 6:
        raise ValueError(f"qwen3_5.build: head_dim must be a multiple of 8 and >= 24, got {head_dim}")
    processor = build_processor(min_pixels, max_pixels)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in ADDED_TOKENS}
    half = rotary // 2
    # Interleaved MRoPE over the rotated half: temporal, height, width sections (11/11/10 of 32 in the real one).
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]

    text_config = decoder_config(
        tok,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        init_std=init_std,
        layer_types=layer_types(num_layers, full_attention_interval),
        head_dim=head_dim,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if moe:
        text_config.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size,
            shared_expert_intermediate_size=hidden_size,
        )
    common = dict(
        text_config=text_config,
        vision_config=vision_config(
            vision_depth,
            hidden_size,
            init_std,
            patch_size=_PATCH,
            merge_size=_MERGE,
            temporal_patch_size=_TEMPORAL,
            num_position_embeddings=64,  # an 8 × 8 learned grid, resampled to each image's
        ),
        **qwen_vision_ids(tok),
        initializer_range=init_std,
        attn_implementation=attn_implementation,
    )
    if moe:
        from transformers import Qwen3_5MoeConfig as config_cls
        from transformers import Qwen3_5MoeForConditionalGeneration as model_cls
    else:
        config_cls, model_cls = Qwen3_5Config, Qwen3_5ForConditionalGeneration
    config = config_cls(**common)
    model = build_model(
        model_cls,
        config,
        seed=seed,
        dtype=dtype,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
    )
    return model, processor
