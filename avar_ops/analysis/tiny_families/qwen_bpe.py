"""Qwen2's tokenizer class with a small vocabulary trained on the spot, for any family built on Qwen2/Qwen3.

LLaVA-OneVision and InternVL use Qwen's byte-level BPE with their own special tokens on top; the tiny models
need the same class and pre-tokenizer (so the template's text splits as the real one's does) with a vocabulary
small enough for an embedding of a few hundred rows.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Sequence

__all__ = ["train_qwen2_tokenizer", "CORPUS", "VOCAB_SIZE"]

# Chat roles, the kind of questions the demo asks, and the words the families' processors insert in text.
CORPUS = [
    "system",
    "user",
    "assistant",
    "You are a helpful assistant.",
    "You are a careful visual reasoning assistant. Look at the image before answering.",
    "Describe the image. What colour is the square? How many circles are there?",
    "What is shown in the picture? Answer with a single word.",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "Let me look back at the image to check my answer. The answer is 3.",
    "Compare the two images and tell me which one has more shapes.",
    "First, I describe the image. Then I reason step by step, and finally I give the answer.",
    "Wait, let me check the image again: the circle is on the left, the square on the right.",
    "Frame1: Frame2: Frame3: Image-1: Image-2: yes no left right top bottom large small one two three four",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ; : ? !",
]

VOCAB_SIZE = 512  # trained vocabulary (bytes, merges and the special tokens); the embedding matches it


def train_qwen2_tokenizer(
    special_tokens: Sequence[str],
    *,
    eos_token: str,
    pad_token: str,
    named_tokens: Optional[Dict[str, str]] = None,
    vocab_size: int = VOCAB_SIZE,
):
    """A `Qwen2Tokenizer` whose BPE is trained on `CORPUS` with Qwen2's normaliser and pre-tokenizer.

    `special_tokens` get the ids 0.. in their order (the real vocabularies number them in the same order, after
    the BPE); `named_tokens` maps attribute names to some of them (e.g. InternVL's `context_image_token`), which
    the tokenizer then exposes as `tok.context_image_token` / `tok.context_image_token_id`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    special_tokens = list(special_tokens)
    for name in (eos_token, pad_token, *(named_tokens or {}).values()):
        if name not in special_tokens:
            raise ValueError(f"train_qwen2_tokenizer: {name!r} is not among special_tokens {special_tokens}")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)

    bpe = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        unk_token=None,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=special_tokens,
        model_specific_special_tokens=dict(named_tokens or {}),
        model_max_length=32768,
    )
    for tok in special_tokens:
        if tokenizer.convert_tokens_to_ids(tok) != bpe["vocab"][tok]:
            raise RuntimeError(f"train_qwen2_tokenizer: special token {tok} did not keep its trained id")
    return tokenizer
