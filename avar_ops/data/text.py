"""The one text check every entry point runs before tokenisation: sample and record fields, benchmark
questions, system prompts from a flag or a config, and generated texts that become training data.

Qwen's special tokens are all written `<|name|>` and the tokenizer matches them anywhere in text, so a marker
typed into a question or a system prompt becomes a real template token: `<|im_end|><|im_start|>system` opens
a second system turn (the token groups then count the user's own words as system text), and `<|image_pad|>`
adds an image slot with no image behind it. Text that long is also refused: no context holds it, and reading
it would only fail later inside the processor.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["TEMPLATE_MARKER", "MAX_TEXT_CHARS", "TextError", "check_text"]

TEMPLATE_MARKER = re.compile(r"<\|[^\s<>|]{1,64}\|>")
# Far beyond any context Qwen2.5-VL takes (128k tokens are well under 1M characters of ordinary text).
MAX_TEXT_CHARS = 1_000_000


class TextError(ValueError):
    """A text field that must not reach the tokenizer; the message is one line naming where and why."""


def check_text(text: Optional[str], *, where: str, field: str, max_chars: int = MAX_TEXT_CHARS) -> Optional[str]:
    """Return `text` unchanged, or raise TextError "WHERE: 'FIELD' contains '<|…|>', …" / "… is N characters …".

    `where` names the file and line, or the sample / record / benchmark id; `field` the key the text came from.
    None passes (an optional field left out).
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TextError(f"{where}: {field!r} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise TextError(f"{where}: {field!r} is {len(text)} characters long; the limit is {max_chars}")
    marker = TEMPLATE_MARKER.search(text)
    if marker is not None:
        raise TextError(
            f"{where}: {field!r} contains {marker.group(0)!r}, a chat-template marker; typed in text it becomes a "
            "special token that changes the turns and token groups (remove it or write it differently)"
        )
    return text
