"""Evaluation samples (image paths, question, optional system prompt) and the chat-template inputs built from them.

A sample is a dict, or one JSONL record:

    {"images": ["a.png", "b.png"] | "image": "a.png", "question": "...", "system": "...",   (optional)
     "id": "...", "response": "..."}                                                          (optional)

This is the record format of `avar_ops.data.records` (the trainers' files) with fewer requirements, so a
training file is also a sample file: `answer` and `meta` are carried along unread, and a conversation written
as `messages` (an optional system turn, one user turn with its images first, an optional final assistant turn)
gives the system prompt, the question and the response.

Relative image paths in a JSONL file are relative to the file's folder. Images may also be PIL images when
samples are built in Python. A sample without "system" gets the chat template's default system prompt.

What is refused, with a ValueError naming the sample (file and line for JSONL) and the field:
- chat-template markers typed in text (`<|im_end|>`, `<|im_start|>`, `<|image_pad|>`, any `<|...|>`): the
  tokenizer turns them into the template's special tokens, which would open turns or add image slots that
  the token groups then count (a "question" could become a system turn);
- two samples with the same id (an explicit "id" or the default, the sample's index): files and report
  entries are named after ids;
- JSONL files that are not UTF-8, images that cannot be decoded, and images whose aspect ratio is beyond
  Qwen2.5-VL's image processor's limit (200).
16-bit greyscale images (PIL modes I;16 and I) are scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from avar_ops.data.images import MAX_ASPECT_RATIO, check_image_size
from avar_ops.data.records import conversation
from avar_ops.data.text import check_messages, check_text
from avar_ops.hf import render_chat

__all__ = [
    "load_samples",
    "normalize_sample",
    "sample_from_record",
    "check_unique_ids",
    "load_images",
    "check_images",
    "chat_messages",
    "build_inputs",
    "check_image_size",
    "MAX_ASPECT_RATIO",
]

# Qwen2-VL's image processor refuses images whose long side is more than 200 times the short one.
# PIL modes holding one integer channel wider than 8 bits (16-bit PNG / TIFF greyscale).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _is_pil(x) -> bool:
    return hasattr(x, "convert") and hasattr(x, "size")


def normalize_sample(record, index: int, base_dir: Optional[str] = None, where: str = "samples") -> dict:
    """Check one record and return {"id", "images", "question", "system", "response"} with resolved paths."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}[{index}]: expected a JSON object / dict, got {type(record).__name__}")
    if "images" in record and "image" in record:
        raise ValueError(f"{where}[{index}]: give either 'images' (a list) or 'image' (one path), not both")
    images = record.get("images", [record["image"]] if "image" in record else [])
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"{where}[{index}]: 'images' must be a list of paths, got {type(images).__name__}")
    resolved = []
    for img in images:
        if _is_pil(img):
            resolved.append(img)
            continue
        if not isinstance(img, (str, os.PathLike)):
            raise ValueError(f"{where}[{index}]: image entries must be paths, got {img!r}")
        path = os.fspath(img)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if os.path.isdir(path):
            raise ValueError(f"{where}[{index}]: image path is a folder, not an image file: {path}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}[{index}]: image file not found: {path}")
        resolved.append(path)
    if "messages" in record:
        record = _from_messages(record, len(resolved), f"{where}[{index}]")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}[{index}]: 'question' must be a non-empty string, got {question!r}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}[{index}]: 'system' must be a string when given, got {type(system).__name__}")
    response = record.get("response")
    if response is not None and not isinstance(response, str):
        raise ValueError(f"{where}[{index}]: 'response' must be a string when given, got {type(response).__name__}")
    for field, text in (("question", question), ("system", system), ("response", response)):
        check_text(text, where=f"{where}[{index}]", field=field)
    sample_id = record.get("id", index)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise ValueError(f"{where}[{index}]: 'id' must be a string or an integer, got {sample_id!r}")
    return {
        "id": str(sample_id),
        "images": resolved,
        "question": question,
        "system": system,
        "response": response,
    }


def _from_messages(record: dict, n_images: int, where: str) -> dict:
    """A training record written as `messages` (avar_ops.data.records) as a sample: its system turn, its one user
    turn (images first, then text) and an optional final assistant turn become system, question and response."""
    try:
        turns = conversation(record, n_images)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    roles = [t["role"] for t in turns]
    if roles not in (["user"], ["system", "user"], ["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(
            f"{where}: 'messages' with turns {roles}; a sample is one question: an optional system turn, one user "
            "turn and an optional final assistant turn"
        )
    text = {t["role"]: "".join(p["text"] for p in t["content"] if p["type"] == "text") for t in turns}
    user = next(t["content"] for t in turns if t["role"] == "user")
    kinds = [p["type"] for p in user]
    if kinds != ["image"] * n_images + ["text"] * (len(kinds) - n_images):
        raise ValueError(f"{where}: 'messages': a sample's images come before its question's text")
    return {**record, "question": text["user"], "system": text.get("system"), "response": text.get("assistant")}


def sample_from_record(record) -> dict:
    """A training `Record` (read from any layout) as a sample: one user turn whose images come before its text
    (how `chat_messages` renders a sample), an optional system turn and an optional final assistant turn.
    ValueError when the conversation does not fit that shape (a measurement would see another prompt)."""
    turns = list(record.messages)
    system = None
    if turns and turns[0]["role"] == "system":
        system = "".join(p["text"] for p in turns.pop(0)["content"] if p["type"] == "text")
    response = record.target
    if record.has_target:
        turns.pop()
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise ValueError(
            f"record {record.id!r}: a sample is one user turn (plus an optional system turn and answer), this "
            f"conversation has {len(turns)} turns before its answer"
        )
    content = turns[0]["content"]
    first_text = next((i for i, p in enumerate(content) if p["type"] == "text"), len(content))
    if any(p["type"] == "image" for p in content[first_text:]):
        raise ValueError(
            f"record {record.id!r}: an image stands after text in the user turn; samples put every image before "
            "the question (move its placeholder to the front)"
        )
    question = "".join(p["text"] for p in content if p["type"] == "text")
    return {
        "id": record.id,
        "images": list(record.images),
        "question": question,
        "system": system,
        "response": response,
    }


def load_samples(path: str, limit: Optional[int] = None, format: str = "avar") -> List[dict]:
    """Read up to `limit` samples from a JSONL file (blank lines are skipped).

    format "avar" reads the sample layout of this module; "sharegpt", "openai" and "auto" read the file as
    training records (`avar_ops.data.formats`) and turn each into a sample (`sample_from_record`); "auto"
    also takes avar samples."""
    from avar_ops.data.formats import resolve_format

    if resolve_format(format) == "auto" and os.path.isfile(path):
        format = _file_layout(path)
    if format != "avar":
        return _samples_from_records(path, limit, format)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"load_samples: limit must be a positive int or None, got {limit!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_samples: data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    samples, wheres = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"load_samples: {path}, line {lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"load_samples: {path}, line {lineno}: not valid JSON ({exc.msg})") from exc
            wheres.append(f"{path}:{lineno}")
            samples.append(normalize_sample(record, len(samples), base, where=wheres[-1]))
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise ValueError(f"load_samples: {path} holds no samples")
    check_unique_ids(samples, wheres)
    return samples


def _file_layout(path: str) -> str:
    """The layout of a file for format "auto" (undecodable lines are left to the reader that reports them)."""
    from avar_ops.data.formats import file_format

    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                lines.append((lineno, json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
    try:
        return file_format(lines)
    except ValueError as exc:
        raise ValueError(f"load_samples: {path}: {exc}") from None


def _samples_from_records(path: str, limit: Optional[int], format: str) -> List[dict]:
    from avar_ops.data.records import load_records

    loaded = load_records(path, format=format, limit=limit, check_images=False)
    return [sample_from_record(r) for r in loaded.records]


def check_unique_ids(samples: Sequence[dict], wheres: Optional[Sequence[str]] = None) -> None:
    """ValueError when two normalised samples share an id (e.g. an explicit "1" and the default id of sample 1)."""
    first = {}
    for i, s in enumerate(samples):
        if s["id"] in first:
            j = first[s["id"]]
            a = wheres[j] if wheres is not None else f"samples[{j}]"
            b = wheres[i] if wheres is not None else f"samples[{i}]"
            raise ValueError(
                f"{a} and {b} have the same id {s['id']!r} (a sample without 'id' is named by its index); "
                "give every sample its own id"
            )
        first[s["id"]] = i


def _to_rgb(img):
    """PIL image -> 8-bit RGB; 16-bit greyscale is scaled (convert("RGB") alone clips it to 0..255)."""
    from PIL import Image

    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)  # [h, w], 0..65535
        grey = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)  # [h, w]
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def load_images(sample: dict) -> list:
    """The sample's images as 8-bit RGB PIL images; ValueError naming the sample for undecodable or too-narrow ones."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for img in sample["images"]:
        name = "a PIL image" if _is_pil(img) else img
        if not _is_pil(img):
            try:
                with Image.open(img) as opened:
                    opened.load()
                    img = opened.copy()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"sample {sample.get('id')!r}: cannot read image {name}: {exc}") from None
        check_image_size(img.size, f"sample {sample.get('id')!r}: image {name}")
        out.append(_to_rgb(img))
    return out


def check_images(samples: Sequence[dict]) -> None:
    """Decode every image of the samples once (ValueError naming the sample and file for a bad one), so that a
    run fails before any model work rather than in the middle of it."""
    for s in samples:
        load_images(s)


def chat_messages(sample: dict, response: Optional[str] = None) -> list:
    """The conversation the chat template renders: [system], user (images then question), [assistant]."""
    messages = []
    if sample.get("system") is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": sample["system"]}]})
    content = [{"type": "image"} for _ in sample["images"]]
    content.append({"type": "text", "text": sample["question"]})
    messages.append({"role": "user", "content": content})
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def build_inputs(
    processor, samples: Sequence[dict], *, responses: Optional[Sequence[Optional[str]]] = None, device=None
) -> dict:
    """Processor outputs (input_ids, attention_mask, pixel_values, image_grid_thw, ...) for a batch, left-padded.

    Without responses the prompt ends with the assistant header (ready for generation); with a response the
    assistant turn holds it (for measuring attention over response tokens).
    """
    texts, images = [], []
    for i, s in enumerate(samples):
        resp = None if responses is None else responses[i]
        add_prompt = resp is None
        messages = chat_messages(s, resp)
        # The processor's own special tokens (`<image>`, `<img>`, …) typed in text would open image slots.
        check_messages(messages, where=f"sample {s.get('id', i)!r}", tokenizer=processor)
        texts.append(render_chat(processor, messages, add_generation_prompt=add_prompt))
        images.append(load_images(s))
    kwargs = {}
    if any(images):
        if not all(images):
            raise ValueError("build_inputs: a batch must not mix samples with and without images; use batch_size=1")
        kwargs["images"] = images
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right
    try:
        inputs = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
    finally:
        tok.padding_side = old_side
    if device is not None:
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return dict(inputs)
