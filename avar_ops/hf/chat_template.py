"""What a chat template is made of, learned by rendering it with sentinel contents.

Every family writes its turns differently: Qwen `<|im_start|>user\\n … <|im_end|>`, GLM `<|user|>\\n …` with no
closing token, and so on. Rather than a parser per family, `template_tokens` renders the tokenizer's own chat
template on a small conversation whose contents are sentinel words (a system turn, a user turn, an assistant turn,
a second user turn, and a user turn holding an image and a video) and reads the token layout off the result:

- a role's **header** is what the template puts right before that role's content, from the last special token
  there (the one that opens the turn: `<|im_start|>` or `<|user|>`) on, up to its first whitespace tokens (the
  "\\n" after `<|im_start|>user`), which are kept apart because a content starting with whitespace can merge
  with them; anything the template writes after them (a `<think>` block in every assistant turn) is content;
- the **openers** are the first tokens of the headers: a turn starts at any of them, and one whose following
  tokens match no known header opens a turn of no known role (a tool turn, say);
- the **closer** is the special token the template puts right after a turn's content (`<|im_end|>`), or none
  (GLM): a turn then runs to the next opener, and an assistant turn ends with that opener (`turn_end`);
- the assistant header is cut to what the **generation prompt** ends with: what comes after the prompt is the
  model's to write, even where the template renders more before a past turn's content (GLM-4.5V's empty
  `<think></think>`);
- the **visual** ids are the image / video placeholders the processor expands (`processor.image_token` /
  `video_token`, or ids the caller gives from the model config);
- the **special** ids are the tokenizer's special tokens: inside a user turn they are template tokens
  (`<|vision_start|>`, `<img>`, …), never the user's text;
- the **part texts** are the ordinary tokens the template writes around a placeholder, found by rendering a user
  turn with and without an image (or video) part: LLaVA-OneVision writes `<image>\n`, InternVL `<IMG_CONTEXT>\n`,
  and that "\n" is the template's, not the user's (Qwen writes none).

What it trusts: the ids alone, as `token_groups` does. Text must be checked before it is rendered
(`avar_ops.data.check_text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = ["TemplateTokens", "TemplateError", "template_tokens", "render_chat"]

ROLES = ("system", "user", "assistant")
_SENTINELS = {"system": "Kestrel", "user": "Walrus", "assistant": "Pelican", "user2": "Marmot", "media": "Osprey"}


class TemplateError(ValueError):
    """The chat template could not be read: it is missing, or its turns do not have the layout avar groups."""


@dataclass(frozen=True)
class TemplateTokens:
    """The token ids a chat template is made of, for one tokenizer (see the module docstring)."""

    openers: Tuple[int, ...]  # first token of every header
    headers: Tuple[Tuple[int, ...], ...]  # per role in ROLES order: header tokens without trailing whitespace
    header_tails: Tuple[Tuple[int, ...], ...]  # per role: the header's trailing whitespace tokens (may be empty)
    closer: Optional[int]  # the token that ends a turn, or None (a turn runs to the next opener)
    visual: Tuple[int, ...]  # image / video placeholder ids (group 1 wherever they are)
    markers: Tuple[int, ...]  # special ids around the placeholders in a rendered image / video part
    special: Tuple[int, ...]  # every special id of the tokenizer (template tokens inside a user turn)
    part_heads: Tuple[Tuple[int, ...], ...] = ()  # ordinary tokens the template writes before an image / video part
    part_tails: Tuple[Tuple[int, ...], ...] = ()  # ordinary tokens the template writes after one (LLaVA's "\n")

    @property
    def turn_end(self) -> int:
        """The token that ends an assistant turn: the closer, or in a template without one the user header's opener
        (what follows an assistant turn when the conversation goes on; GLM's generation stops on `<|user|>`, and
        GLM's own fine-tuning appends it after the last answer). SFT data whose template renders no closer ends
        with it, so the model learns to stop."""
        return self.closer if self.closer is not None else self.headers[ROLES.index("user")][0]

    @property
    def vision_ids(self) -> Tuple[int, ...]:
        """The placeholders and the markers around them: the tokens an image or video part renders to."""
        return tuple(sorted(set(self.visual) | set(self.markers)))


_CACHE: Dict[Tuple[int, Tuple[int, ...]], Tuple[object, TemplateTokens]] = {}


def _tokenizer_of(obj):
    tok = getattr(obj, "tokenizer", obj)
    if not hasattr(tok, "convert_tokens_to_ids") or not hasattr(tok, "encode"):
        raise TypeError(
            f"token_groups: tokenizer must be a Hugging Face tokenizer or a processor with .tokenizer, "
            f"got {type(obj).__name__}"
        )
    return tok


def _special_ids(tok) -> Tuple[int, ...]:
    ids = {int(i) for i in getattr(tok, "all_special_ids", []) or []}
    for idx, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return tuple(sorted(ids))


def _visual_ids(obj, tok, given: Optional[Iterable[int]]) -> Tuple[int, ...]:
    if given is not None:
        ids = tuple(sorted({int(i) for i in given if i is not None and int(i) >= 0}))
        if not ids:
            raise TemplateError("token_groups: visual_ids is empty; give the image / video placeholder ids")
        return ids
    names = []
    for holder in (obj, tok):
        for attr in ("image_token", "video_token"):
            name = getattr(holder, attr, None)
            if isinstance(name, str) and name and name not in names:
                names.append(name)
    ids = []
    for name in names:
        idx = tok.convert_tokens_to_ids(name)
        if idx is not None and idx != tok.unk_token_id and tok.convert_ids_to_tokens(idx) == name:
            ids.append(int(idx))
    if not ids:
        raise TemplateError(
            f"token_groups: cannot tell the image placeholder token of {type(obj).__name__}: it has no image_token; "
            "pass the processor, or the model's image / video token ids"
        )
    return tuple(sorted(set(ids)))


def _render(tok, template, messages, generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # a template raising on a layout it refuses (e.g. no system role)
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc


def _between(text: str, before: Optional[str], after: Optional[str]) -> str:
    start = 0 if before is None else text.index(before) + len(before)
    end = len(text) if after is None else text.index(after, start)
    return text[start:end]


def _split_header(tok, special: set, segment: str, role: str) -> Tuple[Tuple[int, ...], Tuple[int, ...], List[int]]:
    """(header, trailing whitespace, tokens before the header) of the text a template puts before `role`'s content."""
    ids = [int(i) for i in tok.encode(segment, add_special_tokens=False)]
    starts = [i for i, t in enumerate(ids) if t in special]
    if not starts:
        raise TemplateError(f"no special token before the {role} content (rendered {segment!r})")
    # The opener is the last special token that names the role, else the last special token at all (Qwen's
    # `<|im_start|>` names no role; GLM's `<|user|>` does, and a `<think>` after it must not be taken).
    naming = [i for i in starts if role in tok.convert_ids_to_tokens(ids[i]).lower()]
    first = naming[-1] if naming else starts[-1]
    header = ids[first:]
    # The header ends at its first whitespace after the opener (the "\n" after `<|im_start|>assistant`); what a
    # template puts after that belongs to the content. A template that writes a think block into every assistant
    # turn (`<|im_start|>assistant\n<think>\n\n</think>\n\n` + content) would otherwise make the block part of
    # the header, which a generation prompt (`…\n<think>\n`) or a turn with reasoning never matches.
    blank = [k for k in range(1, len(header)) if not tok.decode([header[k]]).strip()]
    if not blank:
        return tuple(header), (), ids[:first]
    end = blank[0]
    while end < len(header) and not tok.decode([header[end]]).strip():
        end += 1
    return tuple(header[: blank[0]]), tuple(header[blank[0] : end]), ids[:first]


def _prompted_header(tok, template, conversation, rendered: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(header, trailing whitespace) of the assistant role: the part of `rendered` (what the template puts before
    an assistant content, from the opener on) that the generation prompt also ends with.

    Everything after the generation prompt is the model's to write, even where the template renders more before a
    past turn's content: GLM-4.5V renders `<|assistant|>\\n<think></think>\\n` before an old answer but prompts
    with `<|assistant|>` alone, and the model writes the think block itself.
    """
    with_prompt = _render(tok, template, conversation, generation_prompt=True)
    without = _render(tok, template, conversation, generation_prompt=False)
    if not with_prompt.startswith(without):
        return _split_tail(tok, rendered)
    prompt = [int(i) for i in tok.encode(with_prompt[len(without) :], add_special_tokens=False)]
    if rendered[0] not in prompt:
        return _split_tail(tok, rendered)
    prompt = prompt[len(prompt) - 1 - prompt[::-1].index(rendered[0]) :]  # from the last opener on
    n = 0
    while n < min(len(prompt), len(rendered)) and prompt[n] == rendered[n]:
        n += 1
    return _split_tail(tok, rendered[:n])


def _split_tail(tok, header) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    header, tail = list(header), []
    while len(header) > 1 and not tok.decode([header[-1]]).strip():
        tail.insert(0, header.pop())
    return tuple(header), tuple(tail)


def _learn(obj, tok, template, visual_ids) -> TemplateTokens:
    special = set(_special_ids(tok))
    s = _SENTINELS
    roles = [("system", s["system"]), ("user", s["user"]), ("assistant", s["assistant"]), ("user", s["user2"])]
    # Contents as plain strings first, then as lists of text parts: some templates read only one of the two and
    # silently drop the other (llava-hf's OneVision template iterates the parts of every message).
    for as_parts in (False, True):
        conversation = [{"role": r, "content": [{"type": "text", "text": v}] if as_parts else v} for r, v in roles]
        text = _render(tok, template, conversation, generation_prompt=True)
        missing = [v for _, v in roles if v not in text]
        if not missing:
            break
    if missing:
        raise TemplateError(f"the template dropped the contents {missing} (rendered {text!r})")
    segments = {
        "system": _between(text, None, s["system"]),
        "user": _between(text, s["system"], s["user"]),
        "assistant": _between(text, s["user"], s["assistant"]),
    }
    headers, tails, before = {}, {}, {}
    for role in ROLES:
        headers[role], tails[role], before[role] = _split_header(tok, special, segments[role], role)
    headers["assistant"], tails["assistant"] = _prompted_header(
        tok, template, conversation[:2], headers["assistant"] + tails["assistant"]
    )
    # What closes a turn: the special token right after the user's content, before the next header (if any).
    closers = [t for t in before["assistant"] if t in special]
    closer = closers[0] if closers else None
    if closer is not None and closer in {h[0] for h in headers.values()}:
        closer = None
    visual = _visual_ids(obj, tok, visual_ids)

    # Markers: the special tokens an image / video part renders to, besides the placeholders themselves.
    markers: set = set()
    for kinds in (("image", "video"), ("image",)):  # a template without video refuses or skips the video part
        media = [{"type": "text", "text": s["media"]}, *({"type": k} for k in kinds), {"type": "text", "text": "."}]
        try:
            rendered = _render(tok, template, [{"role": "user", "content": media}], generation_prompt=False)
        except TemplateError:
            continue
        if s["media"] in rendered:
            part = _between(rendered, s["media"], None)
            markers = {int(i) for i in tok.encode(part, add_special_tokens=False) if int(i) in special}
            break
    markers -= set(visual) | {closer} | {h[0] for h in headers.values()}
    part_heads, part_tails = _part_texts(tok, template, special, set(visual))
    return TemplateTokens(
        openers=tuple(sorted({h[0] for h in headers.values()})),
        headers=tuple(headers[r] for r in ROLES),
        header_tails=tuple(tails[r] for r in ROLES),
        closer=closer,
        visual=visual,
        markers=tuple(sorted(markers)),
        special=tuple(sorted(special)),
        part_heads=part_heads,
        part_tails=part_tails,
    )


def _part_texts(tok, template, special: set, visual: set) -> Tuple[Tuple[Tuple[int, ...], ...], ...]:
    """(heads, tails): the ordinary tokens the template writes before / after the special tokens of an image or
    video part, from the difference between a user turn rendered with and without that part."""
    s = _SENTINELS["media"]
    try:
        without = _render(tok, template, [{"role": "user", "content": [{"type": "text", "text": s}]}], False)
    except TemplateError:  # a template refusing a lone user turn: no part text is learned
        return (), ()
    heads, tails = set(), set()
    for kind in ("image", "video"):
        try:
            content = [{"type": kind}, {"type": "text", "text": s}]
            with_part = _render(tok, template, [{"role": "user", "content": content}], False)
        except TemplateError:  # a template without video
            continue
        # The part is what the longest common prefix and suffix leave of the rendering with it.
        prefix = 0
        while prefix < len(without) and without[prefix] == with_part[prefix]:
            prefix += 1
        suffix = 0
        while suffix < len(without) - prefix and without[-1 - suffix] == with_part[-1 - suffix]:
            suffix += 1
        part = with_part[prefix : len(with_part) - suffix]
        ids = [int(i) for i in tok.encode(part, add_special_tokens=False)]
        marks = [i for i, t in enumerate(ids) if t in special]
        if not any(t in visual for t in ids) or not marks:
            continue  # the difference is not a placeholder part (the template changed something else)
        if marks[0] > 0:
            heads.add(tuple(ids[: marks[0]]))
        if marks[-1] < len(ids) - 1:
            tails.add(tuple(ids[marks[-1] + 1 :]))
    return tuple(sorted(heads)), tuple(sorted(tails))


def template_tokens(tokenizer, visual_ids: Optional[Iterable[int]] = None) -> TemplateTokens:
    """Learn the token layout of the chat template of `tokenizer` (a tokenizer, or a processor holding one).

    `visual_ids` are the image / video placeholder ids; by default they are read from the processor's (or
    tokenizer's) `image_token` / `video_token`. The result is cached per tokenizer object.
    Raises `TemplateError` when the tokenizer has no chat template or its turns cannot be read.
    """
    if isinstance(tokenizer, TemplateTokens):
        return tokenizer
    tok = _tokenizer_of(tokenizer)
    key = (id(tokenizer), tuple(visual_ids) if visual_ids is not None else ())
    cached = _CACHE.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    template = getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None)
    if not template:
        raise TemplateError(
            f"token_groups: {type(tokenizer).__name__} has no chat template; groups are read from the template"
        )
    try:
        result = _learn(tokenizer, tok, template, visual_ids)
    except TemplateError as exc:
        if str(exc).startswith("token_groups:"):
            raise
        raise TemplateError(f"token_groups: cannot read the turns of this chat template: {exc}") from exc
    _CACHE[key] = (tokenizer, result)
    return result


_RAW_LISTS: Dict[int, Tuple[object, frozenset]] = {}


def _roles_printing_lists(processor) -> frozenset:
    """The roles whose turns the chat template prints with `{{ content }}` as it comes: a list of text parts
    then appears as its Python repr (GLM-4.1V's published template does this for system and assistant turns)."""
    cached = _RAW_LISTS.get(id(processor))
    if cached is not None and cached[0] is processor:
        return cached[1]
    tok = _tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    probe = _SENTINELS["user"]
    raw = set()
    for role in ROLES:
        turns = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}] if role == "assistant" else []
        turns.append({"role": role, "content": [{"type": "text", "text": probe}]})
        try:
            text = _render(tok, template, turns, generation_prompt=False)
        except TemplateError:
            continue
        if f"'text': '{probe}'" in text or f'"text": "{probe}"' in text:
            raw.add(role)
    result = frozenset(raw)
    _RAW_LISTS[id(processor)] = (processor, result)
    return result


def render_chat(processor, messages, *, add_generation_prompt: bool) -> str:
    """The processor's chat template applied to `messages` (avar writes contents as lists of parts).

    For roles whose template prints a content list as it comes (its Python repr), a content made only of text
    parts is passed as their joined text instead; every other template gets the messages unchanged (some, such
    as LLaVA-OneVision's, read contents only as lists).
    """
    raw = _roles_printing_lists(processor) if messages else frozenset()
    if raw:
        messages = [
            {**m, "content": "".join(p.get("text", "") for p in m["content"])}
            if m.get("role") in raw
            and isinstance(m.get("content"), list)
            and all(isinstance(p, dict) and p.get("type") == "text" for p in m["content"])
            else m
            for m in messages
        ]
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
