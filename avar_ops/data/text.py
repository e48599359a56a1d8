"""The one text check every entry point runs before tokenisation: sample and record fields, benchmark
questions, system prompts from a flag or a config, and generated texts that become training data.

Qwen's special tokens are all written `<|name|>` and the tokenizer matches them anywhere in text, so a marker
typed into a question or a system prompt becomes a real template token: `<|im_end|><|im_start|>system` opens
a second system turn (the token groups then count the user's own words as system text), and `<|image_pad|>`
adds an image slot with no image behind it. Other families write some of their special tokens differently
(LLaVA's `<image>`, InternVL's `<img>` / `<IMG_CONTEXT>`), so where the tokenizer is known the check also
refuses every special token of that tokenizer, whatever its spelling. Text that long is also refused: no
context holds it, and reading it would only fail later inside the processor.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

__all__ = ["TEMPLATE_MARKER", "MAX_TEXT_CHARS", "TextError", "check_messages", "check_text", "special_token_strings"]

TEMPLATE_MARKER = re.compile(r"<\|[^\s<>|]{1,64}\|>")
# Far beyond any context Qwen2.5-VL takes (128k tokens are well under 1M characters of ordinary text).
MAX_TEXT_CHARS = 1_000_000


class TextError(ValueError):
    """A text field that must not reach the tokenizer; the message is one line naming where and why."""


_SPECIAL_CACHE: Dict[int, Tuple[object, Tuple[str, ...], Optional["re.Pattern[str]"]]] = {}


def special_token_strings(tokenizer) -> Tuple[str, ...]:
    """The strings `tokenizer` (or a processor holding one) turns into special tokens wherever they stand in text.

    These are its named and extra special tokens and every added token flagged special; longest first.
    """
    return _special_tokens(tokenizer)[1]


def _special_tokens(tokenizer) -> Tuple[object, Tuple[str, ...], Optional["re.Pattern[str]"]]:
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    cached = _SPECIAL_CACHE.get(id(tok))
    if cached is not None and cached[0] is tok:
        return cached
    if not hasattr(tok, "all_special_tokens"):
        raise TypeError(
            f"check_text: tokenizer must be a Hugging Face tokenizer or a processor with .tokenizer, "
            f"got {type(tokenizer).__name__}"
        )
    names = {str(t) for t in tok.all_special_tokens}
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            names.add(str(added.content))
    names.discard("")
    ordered = tuple(sorted(names, key=lambda s: (-len(s), s)))
    pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
    _SPECIAL_CACHE[id(tok)] = (tok, ordered, pattern)
    return _SPECIAL_CACHE[id(tok)]


def check_text(
    text: Optional[str], *, where: str, field: str, max_chars: int = MAX_TEXT_CHARS, tokenizer=None
) -> Optional[str]:
    """Return `text` unchanged, or raise TextError "WHERE: 'FIELD' contains '<|…|>', …" / "… is N characters …".

    `where` names the file and line, or the sample / record / benchmark id; `field` the key the text came from.
    None passes (an optional field left out). With `tokenizer` (a tokenizer or a processor holding one) every
    special token of it is refused too (`special_token_strings`), not only those written `<|…|>`.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TextError(f"{where}: {field!r} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise TextError(f"{where}: {field!r} is {len(text)} characters long; the limit is {max_chars}")
    marker = TEMPLATE_MARKER.search(text)
    if marker is None and tokenizer is not None:
        pattern = _special_tokens(tokenizer)[2]
        marker = pattern.search(text) if pattern is not None else None
    if marker is not None:
        raise TextError(
            f"{where}: {field!r} contains {marker.group(0)!r}, a chat-template marker; typed in text it becomes a "
            "special token that changes the turns and token groups (remove it or write it differently)"
        )
    return text


def check_messages(messages, *, where: str, tokenizer) -> None:
    """Run `check_text` with `tokenizer` on every text of chat `messages` (a content string or its text parts).

    Entry points call it where the text meets the tokenizer that will render it: samples and records are checked
    for `<|…|>` markers when they are read, before any model is loaded; the family's own special tokens are
    known only once its processor is.
    """
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        role = message.get("role", "?") if isinstance(message, dict) else "?"
        if isinstance(content, str):
            check_text(content, where=where, field=f"{role} message {i}", tokenizer=tokenizer)
        elif isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    check_text(part["text"], where=where, field=f"{role} message {i}", tokenizer=tokenizer)
