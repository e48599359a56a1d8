"""Evaluation samples (image paths, question, optional system prompt) and the chat-template inputs built from them.

A sample is a dict, or one JSONL record:

    {"images": ["a.png", "b.png"] | "image": "a.png", "question": "...", "system": "...",   (optional)
     "id": "...", "response": "..."}                                                          (optional)

Relative image paths in a JSONL file are relative to the file's folder. Images may also be PIL images when
samples are built in Python. A sample without "system" gets the chat template's default system prompt.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

from avar_ops.method import Intervention, generate

__all__ = ["load_samples", "normalize_sample", "load_images", "chat_messages", "build_inputs", "generate_answers"]


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
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}[{index}]: image file not found: {path}")
        resolved.append(path)
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}[{index}]: 'question' must be a non-empty string, got {question!r}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}[{index}]: 'system' must be a string when given, got {type(system).__name__}")
    response = record.get("response")
    if response is not None and not isinstance(response, str):
        raise ValueError(f"{where}[{index}]: 'response' must be a string when given, got {type(response).__name__}")
    return {
        "id": str(record.get("id", index)),
        "images": resolved,
        "question": question,
        "system": system,
        "response": response,
    }


def load_samples(path: str, limit: Optional[int] = None) -> List[dict]:
    """Read up to `limit` samples from a JSONL file (blank lines are skipped)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"load_samples: limit must be a positive int or None, got {limit!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_samples: data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"load_samples: {path}, line {lineno}: not valid JSON ({exc.msg})") from exc
            samples.append(normalize_sample(record, len(samples), base, where=f"{path}:{lineno}"))
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise ValueError(f"load_samples: {path} holds no samples")
    return samples


def load_images(sample: dict) -> list:
    from PIL import Image

    out = []
    for img in sample["images"]:
        out.append(img.convert("RGB") if _is_pil(img) else Image.open(img).convert("RGB"))
    return out


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


def build_inputs(processor, samples: Sequence[dict], *, responses: Optional[Sequence[Optional[str]]] = None,
                 device=None) -> dict:
    """Processor outputs (input_ids, attention_mask, pixel_values, image_grid_thw, ...) for a batch, left-padded.

    Without responses the prompt ends with the assistant header (ready for generation); with a response the
    assistant turn holds it (for measuring attention over response tokens).
    """
    texts, images = [], []
    for i, s in enumerate(samples):
        resp = None if responses is None else responses[i]
        add_prompt = resp is None
        texts.append(processor.apply_chat_template(chat_messages(s, resp), add_generation_prompt=add_prompt,
                                                   tokenize=False))
        images.append(load_images(s))
    kwargs = {}
    if any(images):
        if not all(images):
            raise ValueError(
                "build_inputs: a batch must not mix samples with and without images; use batch_size=1"
            )
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


def generate_answers(model, processor, samples, *, intervention: Optional[Intervention] = None,
                     max_new_tokens: int = 32, batch_size: int = 1) -> List[dict]:
    """Greedy answers to `samples` (dicts / JSONL records) under the intervention, `batch_size` at a time.

    Returns one {"id", "answer", "tokens"} per sample; tokens are the generated ids up to and including the
    end-of-turn token.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"generate: batch_size must be a positive int, got {batch_size!r}")
    samples = [normalize_sample(s, i) for i, s in enumerate(samples)]
    device = next(model.parameters()).device
    results = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        inputs = build_inputs(processor, batch, device=device)
        rows = generate(model, processor, inputs, intervention=intervention, max_new_tokens=max_new_tokens)
        for s, tokens in zip(batch, rows):
            results.append({"id": s["id"], "answer": processor.tokenizer.decode(tokens, skip_special_tokens=True),
                            "tokens": tokens})
    return results
