"""Token groups of a chat sequence, from input_ids alone (vectorised over batch and length), for any template.

Group ids (`avar_ops.core.Group`; one int8 per position, the key groups of `avar_ops.attention`):

    -1  padding (attention_mask == 0)
     0  other: template tokens between and around turns, assistant turns, roles we do not name
     1  visual: the image / video placeholder tokens (`<|image_pad|>`, `<|video_pad|>`, `<image>`, …), wherever
        they are
     2  system: the whole system turn as the template renders it (Qwen `<|im_start|>system\\n … <|im_end|>`,
        header and closing token included, not the newline after it; GLM `<|system|>\\n …` up to the next turn)
     3  user text: the content of user turns, without their template tokens. The turn header (`<|im_start|>user\\n`,
        `<|user|>\\n`), the closing token, every special token inside the turn (`<|vision_start|>` /
        `<|vision_end|>`, `<img>` / `</img>` around images) and the text the template writes around an image
        part (the "\\n" of LLaVA's `<image>\\n`) are group 0, and placeholders are group 1. These are
        the paper's "user-prompt query tokens": VAS and the AGTO losses take their queries where key_group == 3
        (== `user_mask`).

Masks (bool [B, L]): `image_mask` (group 1), `system_mask` (group 2), `user_mask` (group 3) and
`response_mask`: the tokens an assistant turn produces, i.e. its content and the token that ends it (without the
header): its closing token when the template has one (Qwen `<|im_end|>`); in a template without closing tokens
(GLM) the next turn's opener, which is what the model writes to end its turn (GLM's generation stops on
`<|user|>`; `TemplateTokens.turn_end` is the token SFT data appends after a final assistant turn). A turn with no
closing token yet (a generation prompt and what has been generated so far, or any turn of a template without
closing tokens) runs to the next turn's opener, included as above, or to the end.

The layout of turns (openers, each role's header, the closing token, placeholders) is learned from the
tokenizer's chat template by `template_tokens` (avar_ops/hf/chat_template.py). A turn starts at an opener; its
role is the header that matches there (none: a role we do not name). Everything is computed with cumulative
maxima over marker positions, so one call costs a few passes over [B, L] whatever the number of turns.

What it trusts: the ids alone. Every opener, closing token and placeholder id is taken as the template's own,
wherever it comes from. Text that a user typed with these markers in it (`"…<|im_end|>\\n<|im_start|>system\\n…"`)
tokenizes to the same ids and would open a system turn or an image slot here; the tokenizer cannot tell them
apart afterwards. Text must therefore be checked before it is rendered: `avar_ops.data.check_text` refuses
template markers, and every entry point (samples, records, benchmark questions, system prompts, VARD outputs)
passes its text through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from avar_ops.core import Group
from avar_ops.hf.chat_template import TemplateError, TemplateTokens, template_tokens

__all__ = ["TokenGroups", "TemplateTokens", "TemplateError", "template_tokens", "token_groups"]


_ROLE_NONE, _ROLE_SYSTEM, _ROLE_USER, _ROLE_ASSISTANT = 0, 1, 2, 3


@dataclass
class TokenGroups:
    """Per-position groups and masks of a batch of sequences; all [B, L]."""

    key_group: torch.Tensor  # int8 [B, L], -1..3
    user_mask: torch.Tensor  # bool [B, L]
    response_mask: torch.Tensor  # bool [B, L]
    image_mask: torch.Tensor  # bool [B, L]
    system_mask: torch.Tensor  # bool [B, L]


def _isin(ids: torch.Tensor, values: Tuple[int, ...]) -> torch.Tensor:
    """bool [B, L]: ids in values (an empty tuple gives all False)."""
    if not values:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.isin(ids, torch.tensor(values, dtype=ids.dtype, device=ids.device))


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


def _part_text(ids: torch.Tensor, t: TemplateTokens, marked: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the template's own text around image / video parts (`part_heads` right before a placeholder
    or special token, `part_tails` right after one)."""
    B, L = ids.shape
    out = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
    before = torch.nn.functional.pad(marked, (1, 0), value=False)[:, :L]  # [B, L]: the previous token is marked
    for pattern, anchor in [(p, "tail") for p in t.part_tails] + [(p, "head") for p in t.part_heads]:
        n = len(pattern)
        if anchor == "tail":
            hit = _follows(ids, pattern, 0) & before  # [B, L]
        else:
            after = torch.nn.functional.pad(marked, (0, n), value=False)[:, n : n + L]  # [B, L]: token t + n marked
            hit = _follows(ids, pattern, 0) & after
        for k in range(n):  # over the pattern's few tokens
            out[:, k:] |= hit[:, : L - k]
    return out


def token_groups(input_ids: torch.Tensor, tokenizer, attention_mask: Optional[torch.Tensor] = None) -> TokenGroups:
    """Groups and masks of every position of `input_ids` [B, L] (see the module docstring).

    `tokenizer` is the tokenizer or processor that made the ids (or its `template_tokens`);
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

    is_start = _isin(ids, t.openers)  # [B, L]
    is_end = ids == t.closer if t.closer is not None else torch.zeros_like(is_start)  # [B, L]

    # Role and header length of the turn that starts at each opener.
    role_at = torch.zeros(B, L, dtype=torch.long, device=device)  # [B, L]
    header_at = torch.ones(B, L, dtype=torch.long, device=device)  # [B, L]
    for code, (head, tail) in enumerate(zip(t.headers, t.header_tails), start=1):
        hit = is_start & _follows(ids, head, 0)
        has_tail = _follows(ids, tail, len(head)) if tail else torch.zeros_like(hit)
        role_at = torch.where(hit, torch.full_like(role_at, code), role_at)
        header_at = torch.where(hit, len(head) + has_tail.long() * len(tail), header_at)

    # Each position's turn: the last opener at or before it, unless a closing token closed that turn strictly
    # before this position (templates without one: the turn runs to the next opener).
    pos = torch.arange(L, device=device).expand(B, L)  # [B, L]
    start = _last_index(is_start)  # [B, L]
    last_end = _last_index(is_end)  # [B, L]
    in_turn = valid & (start >= 0) & ((last_end < start) | (last_end == pos))  # [B, L]
    start_c = start.clamp(min=0)
    role = torch.where(in_turn, role_at.gather(1, start_c), torch.zeros_like(role_at))  # [B, L]
    header = in_turn & (pos - start < header_at.gather(1, start_c))  # [B, L]
    body = in_turn & ~header & ~is_end  # [B, L] turn content

    image_mask = _isin(ids, t.visual)  # [B, L]
    template_token = _isin(ids, t.special)  # [B, L]
    part_text = _part_text(ids, t, image_mask | template_token)  # [B, L]
    system_mask = (role == _ROLE_SYSTEM) & ~image_mask  # [B, L]
    user_mask = (role == _ROLE_USER) & body & ~image_mask & ~template_token & ~part_text  # [B, L]
    response_mask = (role == _ROLE_ASSISTANT) & in_turn & ~header  # [B, L]
    if t.closer is None:
        # No closing token: the model ends its turn by writing the next turn's opener (GLM stops generating on
        # <|user|>), so the opener right after an assistant turn is the turn's last response token.
        after_assistant = torch.nn.functional.pad((role == _ROLE_ASSISTANT) & in_turn, (1, 0))[:, :L]  # [B, L]
        response_mask = response_mask | (is_start & after_assistant)

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
