"""What every tiny-model builder shares: the byte-level BPE trained on the spot, the processor classes, the
decoder and vision configs, and the seeded build that ends in an eval-mode model with greedy generation settings.

The builders (`tiny_qwen` and `tiny_families.*`) differ in their configs, templates and special tokens; the
steps here are the same for all of them, so a change to one (say, how the BPE is trained) reaches every family.
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "ROLES",
    "SENTENCES",
    "SYMBOLS",
    "QWEN_CORPUS",
    "TINY_MAX_POSITIONS",
    "train_byte_level_bpe",
    "bpe_tokenizer",
    "check_token_ids",
    "qwen2_tokenizer",
    "qwen_ids",
    "qwen_vision_ids",
    "image_processor_class",
    "video_processor_class",
    "qwen2_vl_image_processor",
    "check_heads",
    "contiguous_mrope_section",
    "decoder_config",
    "qwen2_vl_text_config",
    "vision_config",
    "seeded",
    "build_model",
]

# Corpus pieces for the BPEs: chat roles, the kind of questions the demo asks and the symbols answers use.
ROLES = ["system", "user", "assistant"]
SENTENCES = [
    "You are a careful visual reasoning assistant. Look at the image before answering.",
    "Describe the image. What colour is the square? How many circles are there?",
    "What is shown in the picture? Answer with a single word.",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "Let me look back at the image to check my answer. The answer is 3.",
    "Compare the two images and tell me which one has more shapes.",
    "First, I describe the image. Then I reason step by step, and finally I give the answer.",
    "Wait, let me check the image again: the circle is on the left, the square on the right.",
]
SYMBOLS = "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ; : ? !"
# For the families on Qwen2/Qwen3 tokenizers, with the words their processors insert in text.
QWEN_CORPUS = [
    *ROLES,
    "You are a helpful assistant.",
    *SENTENCES,
    "Frame1: Frame2: Frame3: Image-1: Image-2: yes no left right top bottom large small one two three four",
    SYMBOLS,
]

# The tiny models' context length (max_position_embeddings), known without building one.
TINY_MAX_POSITIONS = 4096


def train_byte_level_bpe(
    corpus: Sequence[str], special_tokens: Sequence, *, split_pattern: str, vocab_size: int, nfc: bool = True
):
    """A `tokenizers.Tokenizer` whose BPE is trained on `corpus` (4 passes) with a tokenizer's own pre-tokenizer.

    The pre-tokenizer is `split_pattern` then byte-level (the layout of Qwen's and GLM's tokenizer.json), with
    an NFC normaliser when `nfc`: trained so, the merges mean the same thing when handed to the real class.
    `special_tokens` (strings or `AddedToken`s) get the ids 0.. in their order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return backend


def bpe_tokenizer(tokenizer_cls, backend, **kwargs):
    """(`tokenizer_cls(vocab=..., merges=..., unk_token=None, **kwargs)`, the vocabulary) from a trained backend."""
    bpe = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    return tokenizer_cls(vocab=bpe["vocab"], merges=merges, unk_token=None, **kwargs), bpe["vocab"]


def check_token_ids(fn: str, tokenizer, vocab: Dict[str, int], tokens: Sequence[str]) -> None:
    """Refuse a tokenizer in which one of `tokens` lost the id the BPE training gave it."""
    for tok in tokens:
        if tokenizer.convert_tokens_to_ids(tok) != vocab[tok]:
            raise RuntimeError(f"{fn}: token {tok} did not keep its trained id")


def qwen2_tokenizer(
    special_tokens: Sequence[str],
    *,
    eos_token: str,
    pad_token: str,
    corpus: Sequence[str] = QWEN_CORPUS,
    named_tokens: Optional[Dict[str, str]] = None,
    vocab_size: int = 512,
):
    """A `Qwen2Tokenizer` whose BPE is trained on `corpus` with Qwen2's normaliser and pre-tokenizer.

    `special_tokens` get the ids 0.. in their order (the real vocabularies number them in the same order, after
    the BPE); `named_tokens` maps attribute names to some of them (e.g. InternVL's `context_image_token`), which
    the tokenizer then exposes as `tok.context_image_token` / `tok.context_image_token_id`.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    special_tokens = list(special_tokens)
    for name in (eos_token, pad_token, *(named_tokens or {}).values()):
        if name not in special_tokens:
            raise ValueError(f"qwen2_tokenizer: {name!r} is not among special_tokens {special_tokens}")
    backend = train_byte_level_bpe(corpus, special_tokens, split_pattern=PRETOKENIZE_REGEX, vocab_size=vocab_size)
    extra = {"model_specific_special_tokens": dict(named_tokens)} if named_tokens else {}
    tokenizer, vocab = bpe_tokenizer(
        Qwen2Tokenizer,
        backend,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=special_tokens,
        model_max_length=32768,
        **extra,
    )
    check_token_ids("qwen2_tokenizer", tokenizer, vocab, special_tokens)
    return tokenizer


def qwen_ids(tokenizer) -> Dict[str, int]:
    """Qwen's begin / end / pad ids (`<|endoftext|>`, `<|im_end|>`, `<|endoftext|>`) as config keywords."""
    text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return dict(bos_token_id=text, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=text)


def qwen_vision_ids(tokenizer) -> Dict[str, int]:
    """Qwen-VL's image / video placeholder and vision start / end ids as config keywords."""
    return dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )


def image_processor_class(name: str):
    """transformers' image processor `name`, its PIL backend (`namePil`, no torchvision needed) when there is one;
    both backends implement the same resizing and patching."""
    import transformers

    try:
        return getattr(transformers, name + "Pil")
    except (AttributeError, ImportError):
        return getattr(transformers, name)


def video_processor_class(name: str, *, who: str, processor: str):
    """transformers' video processor `name`, or a one-line ImportError: the processor classes insist on a video
    processor, which is built on torchvision."""
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError) as exc:
        raise ImportError(
            f"{who} needs torchvision: {processor} requires {name}, which is built on torchvision"
        ) from exc


def qwen2_vl_image_processor(
    min_pixels: int, max_pixels: int, *, patch_size: int, merge_size: int = 2, temporal_patch_size: int = 2, **extra
):
    """The real Qwen2-VL image processor (which Qwen2.5-VL, Qwen3-VL and Qwen3.5 use) with small pixel budgets."""
    return image_processor_class("Qwen2VLImageProcessor")(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
        **extra,
    )


def check_heads(fn: str, hidden_size: int, num_heads: int, num_kv_heads: int) -> int:
    """head_dim = hidden_size / num_heads, refusing sizes that do not divide (in one line naming `fn`)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"{fn}: need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    return hidden_size // num_heads


def contiguous_mrope_section(head_dim: int) -> List[int]:
    """Qwen2/2.5-VL's contiguous temporal / height / width sections of the half head dim (16/24/24 of 64)."""
    half = head_dim // 2
    return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


def decoder_config(
    tokenizer, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, init_std: float, **extra
) -> dict:
    """The tiny text decoder's config keywords (MLP twice the hidden size, TINY_MAX_POSITIONS), plus `extra`."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=TINY_MAX_POSITIONS,
        initializer_range=init_std,
        **extra,
    )


def qwen2_vl_text_config(
    fn: str, tokenizer, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, init_std: float
) -> dict:
    """Qwen2-VL's and Qwen2.5-VL's text decoder: GQA with contiguous MRoPE sections, Qwen's token ids."""
    head_dim = check_heads(fn, hidden_size, num_heads, num_kv_heads)
    if head_dim % 4:
        raise ValueError(f"{fn}: head_dim = {head_dim} must be a multiple of 4 (3D rotary split)")
    return decoder_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        init_std=init_std,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": contiguous_mrope_section(head_dim),
        },
        **qwen_ids(tokenizer),
    )


def vision_config(
    depth: int,
    out_hidden_size: int,
    init_std: float,
    *,
    patch_size: int,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    **extra,
) -> dict:
    """The tiny vision tower of the Qwen-VL / GLM-V kind: `depth` blocks of width 32 (2 heads) on patches of
    `patch_size` pixels × `temporal_patch_size` frames, merged `merge_size`² into `out_hidden_size`; plus `extra`."""
    return dict(
        depth=depth,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=out_hidden_size,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        initializer_range=init_std,
        **extra,
    )


@contextlib.contextmanager
def seeded(seed: int):
    """Draws inside come from `seed`; the caller's CPU generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(
    model_cls,
    config,
    *,
    seed: int,
    dtype: torch.dtype,
    eos_token_id,
    pad_token_id: int,
    bos_token_id: Optional[int],
    init: Optional[Callable[[torch.nn.Module], None]] = None,
):
    """`model_cls(config)` drawn from `seed` (then `init(model)`, under the same generator), in `dtype`, in eval
    mode, generating greedily with the given eos / pad / bos ids."""
    with seeded(seed):
        model = model_cls(config)
        if init is not None:
            init(model)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.eos_token_id = eos_token_id
    gen.pad_token_id = pad_token_id
    gen.bos_token_id = bos_token_id
    gen.do_sample = False
    return model
