"""Token groups of a Qwen2.5-VL chat sequence, from input_ids alone (vectorised over batch and length).

Group ids (`avar_ops.core.Group`; one int8 per position, the key groups of `avar_ops.attention`):

    -1  padding (attention_mask == 0)
     0  other: template tokens between and around turns, assistant turns, roles we do not name
     1  visual: <|image_pad|> and <|video_pad|> tokens, wherever they are
     2  system: the whole system turn as the template renders it, `<|im_start|>system\\n … <|im_end|>`
        (markers included, not the newline after <|im_end|>)
     3  user text: the content of user turns, without their template tokens. The turn header
        `<|im_start|>user\\n`, the closing `<|im_end|>` and the `<|vision_start|>` / `<|vision_end|>` markers
        around images are group 0, and image/video pads are group 1. These are the paper's "user-prompt query
        tokens": VAS and the AGTO losses take their queries where key_group == 3 (== `user_mask`).

Masks (bool [B, L]): `image_mask` (group 1), `system_mask` (group 2), `user_mask` (group 3) and
`response_mask`: the tokens an assistant turn produces, i.e. its content and its closing `<|im_end|>`
(without the `<|im_start|>assistant\\n` header). A turn with no `<|im_end|>` yet (a generation prompt and what
has been generated so far) runs to the end of the sequence.

A turn is `<|im_start|>` ROLE `\\n` … `<|im_end|>`; its role is read from the tokens right after `<|im_start|>`.
Everything is computed with cumulative maxima over marker positions, so one call costs a few passes over
[B, L] whatever the number of turns.

What it trusts: the ids alone. Every `<|im_start|>`, `<|im_end|>`, `<|image_pad|>` / `<|video_pad|>` and
`<|vision_start|>` / `<|vision_end|>` id is taken as the template's own, wherever it comes from. Text that a
user typed with these markers in it (`"…<|im_end|>\\n<|im_start|>system\\n…"`) tokenizes to the same ids and
would open a system turn or an image slot here; the tokenizer cannot tell them apart afterwards. Text must
therefore be checked before it is rendered: `avar_ops.data.check_text` refuses any `<|…|>` marker, and every
entry point (samples, records, benchmark questions, system prompts, VARD outputs) passes its text through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from avar_ops.core import Group

__all__ = ["TokenGroups", "TemplateTokens", "template_tokens", "token_groups"]


_ROLE_NONE, _ROLE_SYSTEM, _ROLE_USER, _ROLE_ASSISTANT = 0, 1, 2, 3


@dataclass(frozen=True)
class TemplateTokens:
    """The token ids the chat template is made of, for one tokenizer."""

    im_start: int
    im_end: int
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    newline: Tuple[int, ...]  # the "\n" that ends a turn header
    roles: Tuple[Tuple[int, ...], ...]  # token ids of "system", "user", "assistant", in _ROLE_* order from 1


@dataclass
class TokenGroups:
    """Per-position groups and masks of a batch of sequences; all [B, L]."""

    key_group: torch.Tensor  # int8 [B, L], -1..3
    user_mask: torch.Tensor  # bool [B, L]
    response_mask: torch.Tensor  # bool [B, L]
    image_mask: torch.Tensor  # bool [B, L]
    system_mask: torch.Tensor  # bool [B, L]


_CACHE: Dict[int, Tuple[object, TemplateTokens]] = {}


def template_tokens(tokenizer) -> TemplateTokens:
    """Read the template's token ids from a Qwen2.5-VL tokenizer (or a processor holding one)."""
    if isinstance(tokenizer, TemplateTokens):
        return tokenizer
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    cached = _CACHE.get(id(tok))
    if cached is not None and cached[0] is tok:
        return cached[1]
    if not hasattr(tok, "convert_tokens_to_ids") or not hasattr(tok, "encode"):
        raise TypeError(
            f"token_groups: tokenizer must be a Hugging Face tokenizer or a processor with .tokenizer, "
            f"got {type(tokenizer).__name__}"
        )

    def special(name: str) -> int:
        idx = tok.convert_tokens_to_ids(name)
        if idx is None or idx == tok.unk_token_id or tok.convert_ids_to_tokens(idx) != name:
            raise ValueError(f"token_groups: the tokenizer has no {name} token; it is not a Qwen2.5-VL tokenizer")
        return int(idx)

    def text(s: str) -> Tuple[int, ...]:
        ids = tuple(int(i) for i in tok.encode(s, add_special_tokens=False))
        if not ids:
            raise ValueError(f"token_groups: the tokenizer encodes {s!r} to no tokens")
        return ids

    result = TemplateTokens(
        im_start=special("<|im_start|>"),
        im_end=special("<|im_end|>"),
        image_pad=special("<|image_pad|>"),
        video_pad=special("<|video_pad|>"),
        vision_start=special("<|vision_start|>"),
        vision_end=special("<|vision_end|>"),
        newline=text("\n"),
        roles=(text("system"), text("user"), text("assistant")),
    )
    _CACHE[id(tok)] = (tok, result)
    return result


def _follows(ids: torch.Tensor, pattern: Tuple[int, ...], offset: int) -> torch.Tensor:
    """bool [B, L]: ids[b, t + offset + k] == pattern[k] for every k (False where that runs off the end)."""
    B, L = ids.shape
    n = len(pattern)
    padded = torch.nn.functional.pad(ids, (0, offset + n), value=-1)  # [B, L + offset + n]
    hit = torch.ones(B, L, dtype=torch.bool, device=ids.device)
    for k, tok in enumerate(pattern):  # over the pattern's few tokens, not over positions
        hit &= padded[:, offset + k : offset + k + L] == tok
    return hit


def _last_index(flag: torch.Tensor) -> torch.Tensor:
    """int64 [B, L]: the largest t' <= t with flag[b, t'], or -1."""
    pos = torch.arange(flag.shape[1], device=flag.device).expand_as(flag)  # [B, L]
    return torch.where(flag, pos, torch.full_like(pos, -1)).cummax(dim=1).values


def token_groups(input_ids: torch.Tensor, tokenizer, attention_mask: Optional[torch.Tensor] = None) -> TokenGroups:
    """Groups and masks of every position of `input_ids` [B, L] (see the module docstring).

    `tokenizer` is the Qwen2.5-VL tokenizer or processor that made the ids (or its `template_tokens`);
    `attention_mask` [B, L] (1 = token, 0 = padding, left or right) marks padding, which gets group -1 and is
    in no mask.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"token_groups: input_ids must be a [B, L] tensor, got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"token_groups: input_ids must be an integer tensor, got {input_ids.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(
                f"token_groups: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}"
            )
    t = template_tokens(tokenizer)
    ids = input_ids.long()  # [B, L]
    B, L = ids.shape
    device = ids.device
    valid = (
        torch.ones(B, L, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device=device).bool()
    )  # [B, L]
    ids = ids.masked_fill(~valid, -1)  # padding never reads as a template token

    is_start = ids == t.im_start  # [B, L]
    is_end = ids == t.im_end  # [B, L]

    # Role and header length (<|im_start|> + role + "\n") of the turn that starts at each <|im_start|>.
    role_at = torch.zeros(B, L, dtype=torch.long, device=device)  # [B, L]
    header_at = torch.ones(B, L, dtype=torch.long, device=device)  # [B, L]
    for code, role_ids in enumerate(t.roles, start=1):
        hit = is_start & _follows(ids, role_ids, 1)
        has_nl = _follows(ids, t.newline, 1 + len(role_ids))
        role_at = torch.where(hit, torch.full_like(role_at, code), role_at)
        header_at = torch.where(hit, 1 + len(role_ids) + has_nl.long() * len(t.newline), header_at)

    # Each position's turn: the last <|im_start|> at or before it, unless an <|im_end|> closed that turn
    # strictly before this position.
    pos = torch.arange(L, device=device).expand(B, L)  # [B, L]
    start = _last_index(is_start)  # [B, L]
    last_end = _last_index(is_end)  # [B, L]
    in_turn = valid & (start >= 0) & ((last_end < start) | (last_end == pos))  # [B, L]
    start_c = start.clamp(min=0)
    role = torch.where(in_turn, role_at.gather(1, start_c), torch.zeros_like(role_at))  # [B, L]
    header = in_turn & (pos - start < header_at.gather(1, start_c))  # [B, L]
    body = in_turn & ~header & ~is_end  # [B, L] turn content

    image_mask = (ids == t.image_pad) | (ids == t.video_pad)  # [B, L]
    vision_marker = (ids == t.vision_start) | (ids == t.vision_end)  # [B, L]
    system_mask = (role == _ROLE_SYSTEM) & ~image_mask  # [B, L]
    user_mask = (role == _ROLE_USER) & body & ~image_mask & ~vision_marker  # [B, L]
    response_mask = (role == _ROLE_ASSISTANT) & in_turn & ~header  # [B, L]

    # masked_fill rather than boolean indexing: no device sync on GPU.
    key_group = torch.zeros(B, L, dtype=torch.int8, device=device)  # [B, L]
    key_group = key_group.masked_fill(system_mask, Group.SYSTEM).masked_fill(user_mask, Group.USER)
    key_group = key_group.masked_fill(image_mask, Group.VISUAL).masked_fill(~valid, Group.MASKED)
    return TokenGroups(
        key_group=key_group,
        user_mask=user_mask,
        response_mask=response_mask,
        image_mask=image_mask,
        system_mask=system_mask,
    )
