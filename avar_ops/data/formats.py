"""Data layouts users already have, read as avar records: LLaMA-Factory's ShareGPT and OpenAI chat messages.

The format (`data_format` in the training recipes, `--data-format` for `avar vas`) picks how a line is read:

- "avar": the record format of `avar_ops.data.records` (question/response or messages with image parts).
- "sharegpt": LLaMA-Factory's ShareGPT layout, one object per line:
      {"conversations": [{"from": "human", "value": "<image>How many circles?"},
                         {"from": "gpt", "value": "<answer>3</answer>"}],
       "images": ["img/7.png"], "system": "optional", "id": "optional", "answer": "optional"}
  `from` is human, gpt or system (a system turn only first, instead of the `system` key); human and gpt turns
  alternate, starting with human (LLaMA-Factory's rule). Each `<image>` in a human turn's text is where the next
  image of `images` stands, in every turn of a multi-turn conversation; their number must equal the number of
  images. LLaMA-Factory's variant with `messages` of `role` / `content` strings (its documented `tags`
  role_tag = role, content_tag = content, user_tag = user, assistant_tag = assistant) reads the same way.
  Tool turns (observation, function_call) and `tools` are refused: nothing here runs tools.
- "openai": OpenAI chat `messages`, one object per line:
      {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/7.png"}},
                                                 {"type": "text", "text": "How many circles?"}]},
                    {"role": "assistant", "content": "<answer>3</answer>"}], "id": "optional", "answer": ...}
  An image URL is a local path relative to the data file's folder or a `file://` URL inside that folder; an
  http(s) URL is refused (nothing is downloaded) and so is a `data:` URL (images are read from files).
- "auto": each line's layout is recognised from its keys; the whole file must be one layout. A line that
  more than one layout reads differently (`messages` with `<image>` in its text and an `images` list: avar puts
  the images before the first user text, ShareGPT where `<image>` stands) is an error asking for the format.

Every layout shares avar's optional keys `id` (default: the file name and line, "train.jsonl:12"), `answer`
(the reference answer RL needs) and `meta`. Image paths follow avar's rule in every layout: inside the data
file's folder (an absolute path there is accepted in the foreign layouts), never leaving it.
"""

from __future__ import annotations

import os
from typing import FrozenSet, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

from avar_ops.data.text import check_text

__all__ = ["FORMATS", "IMAGE_PLACEHOLDER", "detect_format", "file_format", "to_avar_record"]

FORMATS = ("avar", "sharegpt", "openai", "auto")
IMAGE_PLACEHOLDER = "<image>"
_LAYOUTS = ("avar", "sharegpt", "openai")
_SHARED_KEYS = {"id", "answer", "meta"}
_SHAREGPT_KEYS = _SHARED_KEYS | {"conversations", "messages", "images", "system"}
_OPENAI_KEYS = _SHARED_KEYS | {"messages"}
# (list key, role key, content key, role value -> avar role)
_SHAREGPT_TAGS = {
    "conversations": ("from", "value", {"human": "user", "gpt": "assistant", "system": "system"}),
    "messages": ("role", "content", {"user": "user", "assistant": "assistant", "system": "system"}),
}
_TOOL_ROLES = ("observation", "function_call", "function", "tool")


# ------------------------------------------------------------------------------------------------ detection


def _texts_of_messages(turns) -> List[str]:
    out = []
    for turn in turns if isinstance(turns, list) else ():
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, str):
            out.append(content)
    return out


def _part_types(turns) -> set:
    kinds = set()
    for turn in turns if isinstance(turns, list) else ():
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            kinds.update(p.get("type") for p in content if isinstance(p, dict))
    return kinds


def detect_format(raw) -> Tuple[FrozenSet[str], bool]:
    """(layouts that can read this decoded line, whether they read it differently).

    Several layouts with `False`: they all give the same record (e.g. `messages` of plain strings without
    images). Several with `True`: the line alone cannot tell them apart (`messages` with `<image>` in its text
    and an `images` list: avar puts the images before the first user text, ShareGPT where `<image>` stands).
    A line no layout recognises gives all of them (the avar parser then says what is missing)."""
    every = frozenset(_LAYOUTS)
    if not isinstance(raw, dict):
        return every, False
    if "conversations" in raw:
        return frozenset({"sharegpt"}), False
    if "messages" not in raw or "question" in raw or "response" in raw or "image" in raw:
        return frozenset({"avar"}), False  # avar's keys (or none: the avar parser says what is missing)
    turns = raw["messages"]
    kinds = _part_types(turns)
    if "image_url" in kinds:
        return frozenset({"openai"}), False
    if "image" in kinds:
        return frozenset({"avar"}), False
    placeholders = any(IMAGE_PLACEHOLDER in t for t in _texts_of_messages(turns))
    if raw.get("images"):
        return (frozenset({"avar", "sharegpt"}), True) if placeholders else (frozenset({"avar"}), False)
    if placeholders:
        return frozenset({"sharegpt"}), False
    if "images" in raw or "system" in raw:
        return frozenset({"avar", "sharegpt"}), False  # keys the openai layout does not have; read alike
    return every, False


def file_format(lines: Sequence[Tuple[int, object]]) -> str:
    """The one layout of a file for format "auto", from its decoded lines [(line number, value)].

    ValueError naming two lines when the file mixes layouts, or a line when it is ambiguous."""
    common = frozenset(_LAYOUTS)
    seen: List[Tuple[int, FrozenSet[str]]] = []  # the lines that narrowed the choice
    unclear = None
    for lineno, raw in lines:
        candidates, differ = detect_format(raw)
        if differ and unclear is None:
            unclear = lineno
        if not common & candidates:
            other, theirs = next(((n, c) for n, c in seen if not c & candidates), seen[-1])
            raise ValueError(
                f"mixed layouts: line {other} reads as {'/'.join(sorted(theirs))}, line {lineno} as "
                f"{'/'.join(sorted(candidates))}; a file holds one layout (set data_format to avar, sharegpt or "
                "openai to read it as one and see what does not fit)"
            )
        if common & candidates != common:
            seen.append((lineno, candidates))
        common = common & candidates
    if unclear is not None and {"avar", "sharegpt"} <= common:
        raise ValueError(
            f"line {unclear}: ambiguous layout: 'messages' with {IMAGE_PLACEHOLDER} in the text and an 'images' "
            "list reads as avar (images before the first user text) or as sharegpt (each image where its "
            f"{IMAGE_PLACEHOLDER} stands); set data_format: sharegpt or data_format: avar"
        )
    for layout in _LAYOUTS:  # several left: they read every line alike
        if layout in common:
            return layout
    raise AssertionError("unreachable: common is never empty here")


# ------------------------------------------------------------------------------------------------ images


def _image_entry(value, base_dir: str, where: str) -> str:
    """A path or URL from a foreign layout as an avar image entry (a path relative to base_dir)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty path string, got {value!r:.80}")
    low = value.strip().lower()
    if low.startswith(("http://", "https://")):
        raise ValueError(
            f"{where} is a web address ({value:.80}); nothing is downloaded: save the image next to the data file "
            "and give its path"
        )
    if low.startswith("data:"):
        raise ValueError(
            f"{where} is a data: URL; images are read from files: save it as a file next to the data file and give "
            "its path"
        )
    path = value
    if low.startswith("file:"):
        parsed = urlparse(value)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: file URL {value!r:.80} names another host ({parsed.netloc})")
        path = unquote(parsed.path)
    elif "://" in value:
        raise ValueError(f"{where}: {value!r:.80} is a URL; give a local path or a file:// URL")
    if os.path.isabs(path):
        root = os.path.realpath(base_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ValueError(f"{where}: image {value!r:.80} is outside the data folder {root}")
        path = os.path.relpath(real, root)
    return path


# ------------------------------------------------------------------------------------------------ ShareGPT


def _text_parts(text: str, role: str, where: str) -> tuple:
    """A turn's text split at its <image> placeholders: (parts, number of placeholders)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) > 1 and role != "user":
        raise ValueError(f"{where}: {IMAGE_PLACEHOLDER} placeholders belong in user (human) turns, not {role}")
    parts = []
    for j, piece in enumerate(pieces):
        if j:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    if not any(p["type"] == "text" and p["text"].strip() for p in parts):
        raise ValueError(f"{where} ({role}) has no text: empty turns are not allowed")
    return parts, len(pieces) - 1


def _from_sharegpt(raw: dict, base_dir: str) -> dict:
    unknown = sorted(set(raw) - _SHAREGPT_KEYS)
    if "tools" in unknown:
        raise ValueError("'tools' is not supported: avar trains and measures chat turns without tool calls")
    if unknown:
        raise ValueError(f"unknown keys {unknown} for the sharegpt layout (allowed: {sorted(_SHAREGPT_KEYS)})")
    lists = [k for k in _SHAREGPT_TAGS if k in raw]
    if len(lists) != 1:
        raise ValueError(
            "a sharegpt record needs exactly one of 'conversations' (from/value) or 'messages' (role/content)"
        )
    key = lists[0]
    role_key, content_key, roles = _SHAREGPT_TAGS[key]
    turns = raw[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' must be a non-empty list of turns, got {turns!r:.80}")
    images = raw.get("images", [])
    if not isinstance(images, list):
        raise ValueError(f"'images' must be a list of paths, got {type(images).__name__}")
    messages, placeholders = [], 0
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict) or set(turn) != {role_key, content_key}:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise ValueError(f"{where} must be an object with exactly {role_key!r} and {content_key!r}, got {got}")
        tag, value = turn[role_key], turn[content_key]
        if tag in _TOOL_ROLES:
            raise ValueError(f"{where}.{role_key} is {tag!r}: tool turns are not supported")
        if tag not in roles:
            raise ValueError(f"{where}.{role_key} must be one of {sorted(roles)}, got {tag!r:.40}")
        role = roles[tag]
        if not isinstance(value, str):
            raise ValueError(f"{where}.{content_key} must be a string, got {type(value).__name__}")
        check_text(value, where=where, field=content_key)
        if role == "system" and i != 0:
            raise ValueError(f"{where}: a system turn may only come first")
        parts, n = _text_parts(value, role, where)
        placeholders += n
        messages.append({"role": role, "content": parts})
    talk = [m["role"] for m in messages if m["role"] != "system"]
    for i, role in enumerate(talk):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(
                f"'{key}': user (human) and assistant (gpt) turns must alternate, starting with a user turn; "
                f"turn {i + 1} after the system turn is {role}"
            )
    if placeholders != len(images):
        raise ValueError(
            f"the text has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but 'images' lists {len(images)}; "
            f"put one {IMAGE_PLACEHOLDER} where each image stands"
        )
    out = {k: raw[k] for k in ("id", "answer", "meta", "system") if k in raw}
    out["images"] = [_image_entry(p, base_dir, f"images[{j}]") for j, p in enumerate(images)]
    out["messages"] = messages
    return out


# -------------------------------------------------------------------------------------------------- OpenAI


def _from_openai(raw: dict, base_dir: str) -> dict:
    unknown = sorted(set(raw) - _OPENAI_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} for the openai layout (allowed: {sorted(_OPENAI_KEYS)})")
    turns = raw.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'messages' must be a non-empty list of turns, got {turns!r:.80}")
    messages, images = [], []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise ValueError(f"{where} must be an object with exactly 'role' and 'content', got {got}")
        role, content = turn["role"], turn["content"]
        if role in _TOOL_ROLES:
            raise ValueError(f"{where}.role is {role!r}: tool turns are not supported")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{where}.role must be system, user or assistant, got {role!r:.40}")
        if isinstance(content, str):
            check_text(content, where=where, field="content")
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str) and set(part) == {"type", "text"}:
                    check_text(part["text"], where=pw, field="text")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and set(part) == {"type", "image_url"}:
                    if role != "user":
                        raise ValueError(f"{pw}: images belong in user turns, not {role}")
                    spec = part["image_url"]
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    images.append(_image_entry(url, base_dir, f"{pw}.image_url.url"))
                    parts.append({"type": "image"})
                else:
                    raise ValueError(
                        f"{pw} must be {{'type': 'text', 'text': str}} or {{'type': 'image_url', 'image_url': "
                        f"{{'url': path}}}}, got {part!r:.80}"
                    )
        else:
            raise ValueError(f"{where}.content must be a string or a list of parts, got {content!r:.80}")
        messages.append({"role": role, "content": parts})
    out = {k: raw[k] for k in ("id", "answer", "meta") if k in raw}
    out["images"] = images
    out["messages"] = messages
    return out


def to_avar_record(raw, layout: str, base_dir: str):
    """The decoded line `raw` of layout "avar", "sharegpt" or "openai" as an avar record (a dict the avar
    parser takes; "avar" returns `raw` itself). ValueError naming the field on a bad line."""
    if layout == "avar":
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"a record must be a JSON object, got {type(raw).__name__}")
    if layout == "sharegpt":
        return _from_sharegpt(raw, base_dir)
    if layout == "openai":
        return _from_openai(raw, base_dir)
    raise ValueError(f"format must be one of {_LAYOUTS}, got {layout!r}")


def resolve_format(fmt: Optional[str]) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    return fmt
