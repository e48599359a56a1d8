"""Shared by the GRPO tests: a synthetic colour task written to disk and a rule-based answer checker.

Each image is one filled square of a single colour on a light background; the question asks for its colour
and the reference answer is the colour's name, so the image alone decides the answer.
"""

import json
import os

COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 60)}
SYSTEM = "You are a careful visual reasoning assistant."


def write_colour_task(folder, n: int = 8, seed: int = 0, size: int = 56) -> str:
    """n records (colours in turn) with PNG images under folder/images; returns the JSONL path."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "train.jsonl")
    names = sorted(COLOURS)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            colour = names[i % len(names)]
            img = Image.new("RGB", (size, size), (245, 245, 240))
            x0, y0 = rng.randint(0, size // 3), rng.randint(0, size // 3)
            ImageDraw.Draw(img).rectangle((x0, y0, x0 + size // 2, y0 + size // 2), fill=COLOURS[colour])
            rel = os.path.join("images", f"c{i}.png")
            img.save(os.path.join(folder, rel))
            record = {"id": f"c{i}", "image": rel, "question": "What colour is the square?", "answer": colour}
            if i % 2 == 0:  # the others get the template's default system prompt: prompts of two lengths
                record["system"] = SYSTEM
            f.write(json.dumps(record) + "\n")
    return path


def contains_checker(completions, references):
    """'correct' when the reference word occurs in the completion (the tests' stand-in for the answer checker)."""
    return ["correct" if ref.lower() in c.lower() else "incorrect" for c, ref in zip(completions, references)]


def hash_checker(completions, references):
    """A deterministic stand-in for the answer checker that marks about half of any completions correct (by a
    hash of the text), so that gating and group advantages are exercised by the tiny random model, which cannot
    read colours."""
    import zlib

    return ["correct" if zlib.crc32(c.encode()) % 2 else "incorrect" for c in completions]


def initial_checker(completions, references):
    """A lenient checker for the tiny random model: correct when the completion contains the reference colour's
    initial letter. Which rollouts count as correct then depends on the image (through the reference), and a
    random policy is right often enough for the gated r_visual to be non-zero."""
    return ["correct" if ref[0].lower() in c.lower() else "incorrect" for c, ref in zip(completions, references)]


def raising_reward(prompts, completions, completion_ids, **columns):
    """A user reward function with a bug: the trainer must report it by name, in one line."""
    raise KeyError("score")
