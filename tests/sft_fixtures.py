"""The tiny Qwen2.5-VL processor and model shared by the SFT tests (training the tokenizer takes seconds, so it is
built once per test process), and small record files on disk."""

import functools
import json
import os

from avar_ops.analysis import build_tiny_qwen2_5_vl, synthetic_images


@functools.lru_cache(maxsize=None)
def tiny_pair(seed: int = 0):
    """(model, processor): the tiny random Qwen2.5-VL; callers must not change the model's weights in place."""
    return build_tiny_qwen2_5_vl(seed=seed)


def tiny_processor():
    return tiny_pair()[1]


QA = [
    ("What colour is the square?", "The square is red."),
    ("How many circles are there in the picture?", "There are two circles."),
    ("Is the shape on the left large or small?", "It is small."),
    ("What is shown in the picture?", "Two shapes on a white background."),
]


def write_sft_records(folder, n: int = 4, seed: int = 0, system: str = "Answer briefly.") -> str:
    """`n` image + question + response records (with their PNGs) in `folder`; returns the JSONL path."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, img in enumerate(synthetic_images(n, seed=seed)):
        name = f"img_{i}.png"
        img.save(os.path.join(folder, name))
        question, response = QA[i % len(QA)]
        rows.append({"id": f"r{i}", "image": name, "system": system, "question": question, "response": response})
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
