"""Shared by the VAS, intervention and CLI tests: the tiny model with eager attention, its full attention maps
(the published method's way of getting them) and synthetic samples written to disk."""

import json
import os

import torch

from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl, synthetic_images
from avar_ops.data.samples import build_inputs
from avar_ops.hf import token_groups

QUESTIONS = [
    ("What colour is the square?", None, 1),
    ("How many circles are there?", "You are a careful visual reasoning assistant.", 2),
    ("Describe the image.", None, 1),
]


def tiny_eager():
    """The tiny model (seed 0, eager attention, so that output_attentions works once the patch is reverted)."""
    return build_tiny_qwen2_5_vl(seed=0, attn_implementation="eager")


def tiny_samples(seed: int = 1):
    """Samples with PIL images: one with two images, one with its own system prompt."""
    images = synthetic_images(4, seed=seed)
    out, used = [], 0
    for i, (question, system, n_img) in enumerate(QUESTIONS):
        out.append({"id": f"s{i}", "images": images[used : used + n_img], "question": question, "system": system})
        used += n_img
    return out


def write_jsonl(tmp_path, samples=None, name="data.jsonl"):
    """Save the samples' images as PNGs next to a JSONL file that names them by relative path."""
    samples = samples if samples is not None else tiny_samples()
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    path = tmp_path / name
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            names = []
            for n, img in enumerate(s["images"]):
                rel = os.path.join("images", f"{s['id']}_{n}.png")
                img.save(tmp_path / rel)
                names.append(rel)
            rec = {"id": s["id"], "images": names, "question": s["question"]}
            if s.get("system") is not None:
                rec["system"] = s["system"]
            f.write(json.dumps(rec) + "\n")
    return path


def eager_maps(model, processor, sample):
    """(attention maps per layer, float64 [1, H, L, L]; TokenGroups) of one sample, from output_attentions."""
    inputs = build_inputs(processor, [sample])
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    groups = token_groups(inputs["input_ids"], processor, inputs["attention_mask"])
    return [a.double() for a in out.attentions], groups, inputs


def masses_from_maps(maps, key_group):
    """Per-layer masses [1, H, L, 4] from full maps: the sums over each group's key columns."""
    onehot = torch.nn.functional.one_hot(key_group.long().clamp(min=0), 4).double()  # [1, L, G]
    onehot = onehot * (key_group >= 0)[..., None].double()
    return [a @ onehot[:, None] for a in maps]
