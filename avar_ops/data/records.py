"""The JSONL record format shared by SFT, VARD and RL data, and a loader that validates every record.

One JSON object per line:

    {"id": "geo-17",                                  optional: a non-empty string or an int, unique in the file
                                                      (default: the file name and line, "train.jsonl:12")
     "image": "img/17.png" | "images": ["a.png", ...] optional: paths relative to the file's folder
     "system": "...",                                 optional: the system prompt (else the chat template's)
     "question": "...", "answer": "...",              a question and its reference answer ...
     "response": "<think>…</think><answer>…</answer>" ... and, for SFT, the target the model learns
     "messages": [{"role": "user"|"assistant"|"system", "content": "..." | [parts]}, ...]
                                                      ... or the whole conversation instead of question/response
     "meta": {...}}                                   optional: free-form provenance, carried along untouched

`messages` and `question` are exclusive. In `messages`, content is a string or a list of parts
`{"type": "text", "text": ...}` / `{"type": "image"}`; string contents get the record's images in front of the
first user turn's text, parts place them where they stand (their count must equal the number of images). A
system turn may only come first and excludes the `system` key. For SFT the conversation must end with an
assistant turn (or the record must have `response`): that turn is the target. For RL the prompt is everything
but a final assistant turn, and `answer` is required.

`load_records` checks every record (JSON syntax, missing/unknown/mistyped keys, empty turns, duplicate ids,
image paths that are absolute or escape the data folder, missing, unreadable or non-image files, what the use
needs, chat-template markers or over-long text in any field the template renders: `avar_ops.data.check_text`)
and reports file, line and reason. Files in LLaMA-Factory's ShareGPT layout or OpenAI chat `messages` are
read too (`format=`, see `avar_ops.data.formats`). A bad record is an error by default; `on_error="skip"` skips bad
records, logs how many, and writes each one with its reason to a rejects file. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from avar_ops.data.formats import file_format, resolve_format, to_avar_record
from avar_ops.data.images import check_image_size
from avar_ops.data.text import check_text

__all__ = [
    "append_rejects",
    "Record",
    "RecordError",
    "LoadedRecords",
    "load_records",
    "parse_record",
    "conversation",
    "USES",
]

logger = logging.getLogger(__name__)

USES = ("sft", "rl", "any")
_KEYS = {"id", "image", "images", "system", "question", "answer", "response", "messages", "meta"}
_ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A bad record: `where` is "FILE:LINE", `reason` says what is wrong."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated record. `messages` is the normalised conversation: a list of {"role", "content"} where
    content is a list of parts ({"type": "image"} or {"type": "text", "text": str}); the system turn is present
    only when the record gave one. `images` are absolute paths, in the order the image parts appear."""

    id: str
    images: Tuple[str, ...]
    messages: Tuple[dict, ...]
    answer: Optional[str]
    meta: Optional[dict]

    @property
    def has_target(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    @property
    def prompt_messages(self) -> List[dict]:
        """The conversation without a final assistant turn (what a policy is prompted with)."""
        return list(self.messages[:-1] if self.has_target else self.messages)

    @property
    def target(self) -> Optional[str]:
        """The final assistant turn's text, or None."""
        if not self.has_target:
            return None
        return "".join(p["text"] for p in self.messages[-1]["content"] if p["type"] == "text")

    @property
    def question(self) -> str:
        """The text of the last user turn."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return "".join(p["text"] for p in m["content"] if p["type"] == "text")
        return ""


@dataclasses.dataclass
class LoadedRecords:
    records: List[Record]
    rejected: int  # bad records skipped (0 unless on_error is "skip" or "report")
    rejects_path: Optional[str]  # where they were written, when some were
    lines: List[int] = dataclasses.field(default_factory=list)  # the file line of each record
    rejects: List[dict] = dataclasses.field(default_factory=list)  # {"file", "line", "reason", "record"} per bad one


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _image_path(entry, base_dir: str) -> str:
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"image paths must be non-empty strings, got {entry!r}")
    if os.path.isabs(entry) or entry.startswith("~"):
        raise ValueError(f"image path {entry!r} must be relative to the data file's folder")
    root = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(root, entry))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"image path {entry!r} leaves the data folder {root}")
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {entry!r} ({path})")
    return path


def _check_image(path: str, entry: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image {entry!r} is not a readable image ({type(exc).__name__}: {exc})") from None
    check_image_size(size, f"image {entry!r}")


def conversation(raw: dict, n_images: int) -> List[dict]:
    """The normalised message list of a record (see `Record`); ValueError on any problem."""
    if "messages" in raw:
        for key in ("question", "response"):
            if key in raw:
                raise ValueError(f"give either 'messages' or 'question'/'response', not both (found {key!r})")
        turns = raw["messages"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"'messages' must be a non-empty list of turns, got {turns!r:.80}")
        out = []
        image_parts = 0
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
                got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
                raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content', got {got}")
            role, content = turn["role"], turn["content"]
            if role not in _ROLES:
                raise ValueError(f"messages[{i}].role must be one of {list(_ROLES)}, got {role!r}")
            if role == "system" and i != 0:
                raise ValueError(f"messages[{i}]: a system turn may only come first")
            if isinstance(content, str):
                parts = [_text_part(content)]
            elif isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "image" and set(part) == {"type"}:
                        if role != "user":
                            raise ValueError(f"messages[{i}].content[{j}]: images belong in user turns")
                        parts.append({"type": "image"})
                        image_parts += 1
                    elif kind == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
                        parts.append(_text_part(part["text"]))
                    else:
                        raise ValueError(
                            f"messages[{i}].content[{j}] must be {{'type': 'image'}} or {{'type': 'text', "
                            f"'text': str}}, got {part!r:.80}"
                        )
            else:
                raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {content!r:.80}")
            if not any(p["type"] == "text" and p["text"].strip() for p in parts):
                raise ValueError(f"messages[{i}] ({role}) has no text: empty turns are not allowed")
            out.append({"role": role, "content": parts})
        if out[0]["role"] == "system" and "system" in raw:
            raise ValueError("give the system prompt either as the 'system' key or as the first turn, not both")
        if not any(m["role"] == "user" for m in out):
            raise ValueError("'messages' has no user turn")
        if image_parts and image_parts != n_images:
            raise ValueError(f"'messages' has {image_parts} image parts but the record has {n_images} images")
        if not image_parts and n_images:
            first_user = next(m for m in out if m["role"] == "user")
            first_user["content"] = [{"type": "image"} for _ in range(n_images)] + first_user["content"]
    else:
        question = raw.get("question")
        if question is None:
            raise ValueError("missing key: a record needs 'messages' or 'question'")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"'question' must be a non-empty string, got {question!r:.80}")
        out = [{"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [_text_part(question)]}]
        if "response" in raw:
            response = raw["response"]
            if not isinstance(response, str) or not response.strip():
                raise ValueError(f"'response' must be a non-empty string, got {response!r:.80}")
            out.append({"role": "assistant", "content": [_text_part(response)]})
    if "system" in raw:
        system = raw["system"]
        if not isinstance(system, str) or not system.strip():
            raise ValueError(f"'system' must be a non-empty string, got {system!r:.80}")
        out.insert(0, {"role": "system", "content": [_text_part(system)]})
    return out


def _texts(raw: dict):
    """(field, text) of every text of a record that the chat template renders."""
    for key in ("system", "question", "response"):
        if isinstance(raw.get(key), str):
            yield key, raw[key]
    for i, turn in enumerate(raw.get("messages") or ()):
        content = turn["content"]
        if isinstance(content, str):
            yield f"messages[{i}].content", content
        else:
            for j, part in enumerate(content):
                if part.get("type") == "text":
                    yield f"messages[{i}].content[{j}].text", part["text"]


def parse_record(
    raw, base_dir: str, use: str = "any", check_images: bool = True, *, default_id: Optional[str] = None
) -> Record:
    """Validate one decoded JSON record against the format; ValueError with the reason when it is bad.

    default_id: the id of a record without one (load_records gives "FILE:LINE"); None makes `id` required."""
    if use not in USES:
        raise ValueError(f"parse_record: use must be one of {USES}, got {use!r}")
    if not isinstance(raw, dict):
        raise ValueError(f"a record must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} (allowed: {sorted(_KEYS)})")
    if "id" not in raw and default_id is None:
        raise ValueError("missing key 'id'")
    rid = raw.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        raise ValueError(f"'id' must be a non-empty string or an int, got {rid!r:.80}")
    if "image" in raw and "images" in raw:
        raise ValueError("give either 'image' (one path) or 'images' (a list), not both")
    entries = raw.get("images", [raw["image"]] if "image" in raw else [])
    if not isinstance(entries, list):
        raise ValueError(f"'images' must be a list of paths, got {type(entries).__name__}")
    images = []
    for entry in entries:
        path = _image_path(entry, base_dir)
        if check_images:
            _check_image(path, entry)
        images.append(path)
    messages = conversation(raw, len(images))
    for name, text in _texts(raw):
        check_text(text, where=f"record {str(rid)!r}", field=name)
    answer = raw.get("answer")
    if answer is not None and (
        not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip()
    ):
        raise ValueError(f"'answer' must be a non-empty string or a number, got {answer!r:.80}")
    meta = raw.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object, got {type(meta).__name__}")
    record = Record(
        id=str(rid),
        images=tuple(images),
        messages=tuple(messages),
        answer=None if answer is None else str(answer),
        meta=meta,
    )
    if use == "sft" and not record.has_target:
        raise ValueError("an SFT record needs a target: 'response', or 'messages' ending with an assistant turn")
    if use == "rl" and record.answer is None:
        raise ValueError("an RL record needs the reference 'answer'")
    return record


def load_records(
    path: str,
    *,
    use: str = "any",
    on_error: str = "raise",
    rejects_path: Optional[str] = None,
    check_images: bool = True,
    limit: Optional[int] = None,
    format: str = "avar",
) -> LoadedRecords:
    """Read and validate a JSONL file of records (blank lines are skipped).

    use: "sft" (each record needs a target), "rl" (each needs an answer) or "any".
    on_error: "raise" (default) raises a `RecordError` at the first bad record; "skip" keeps going, logs how
    many were skipped and appends each bad line with its file, line and reason to `rejects_path` (required; a row
    the file already holds is not written again); "report" keeps going and writes nothing: every bad record is in
    the result's `rejects`, and a file without a good record is no error (for checks that list every problem at
    once).
    check_images: open every image to check it is one (off only for data already checked).
    format: the file's layout, "avar", "sharegpt", "openai" or "auto" (`avar_ops.data.formats`); a record
    without an id is named "FILE_NAME:LINE".
    """
    if on_error not in ("raise", "skip", "report"):
        raise ValueError(f"load_records: on_error must be 'raise', 'skip' or 'report', got {on_error!r}")
    if on_error == "skip" and not rejects_path:
        raise ValueError("load_records: on_error='skip' needs rejects_path, the file the bad records go to")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"load_records: limit must be a positive int or None, got {limit!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_records: data file not found: {path}")
    layout = resolve_format(format)
    base_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    raw_lines = []  # (line number, text, decoded value or the error that line has)
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            line = data.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {exc.start + 1}); save the file as "
                        "UTF-8"
                    ) from None
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError as exc:
                value = exc
            raw_lines.append((lineno, line, value))
    if layout == "auto":
        try:
            layout = file_format([(n, v) for n, _, v in raw_lines if not isinstance(v, ValueError)])
        except ValueError as exc:
            raise RecordError(path, str(exc)) from None
    records: List[Record] = []
    lines: List[int] = []
    seen: Dict[str, int] = {}
    rejects: List[dict] = []
    for lineno, line, value in raw_lines:
        where = f"{path}:{lineno}"
        try:
            if isinstance(value, ValueError):
                raise value
            raw = to_avar_record(value, layout, base_dir)
            record = parse_record(raw, base_dir, use=use, check_images=check_images, default_id=f"{name}:{lineno}")
            if record.id in seen:
                raise ValueError(f"duplicate id {record.id!r} (first on line {seen[record.id]})")
        except ValueError as exc:
            if on_error == "raise":
                raise RecordError(where, str(exc)) from None
            rejects.append({"file": path, "line": lineno, "reason": str(exc), "record": line.rstrip("\n")})
            continue
        seen[record.id] = lineno
        records.append(record)
        lines.append(lineno)
        if limit is not None and len(records) >= limit:
            break
    if on_error == "report":
        return LoadedRecords(records, len(rejects), None, lines, rejects)
    if rejects:
        _append_jsonl(rejects_path, rejects)
        logger.warning(
            "%s: skipped %d bad record(s), written with their reasons to %s", path, len(rejects), rejects_path
        )
    if not records:
        raise RecordError(path, "no valid records" + (f" ({len(rejects)} rejected)" if rejects else ""))
    return LoadedRecords(
        records=records,
        rejected=len(rejects),
        rejects_path=rejects_path if rejects else None,
        lines=lines,
        rejects=rejects,
    )


def append_rejects(path: str, rows: Sequence[dict]) -> None:
    """Append rejects rows ({"file", "line", "reason", "record"}) to `path`, skipping those it already holds."""
    _append_jsonl(path, rows)


def _append_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Append the rows the file does not hold yet: a rerun over the same data adds no duplicate rejects."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    seen = set()
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    seen.add(json.dumps(json.loads(line), ensure_ascii=False, sort_keys=True))
                except ValueError:
                    continue
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            key = json.dumps(row, ensure_ascii=False, sort_keys=True)
            if key not in seen:
                seen.add(key)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
