"""A small example data set for a first run of `avar-train sft` and `avar-train grpo`: images drawn here, questions
whose answer the image decides and a checker can verify.

Three tasks, in turn:
- count:  a few circles (and square distractors) -> "How many circles are there?"            answer 1..4
- colour: one square among circles of other colours -> "What colour is the square?"            answer a colour
- bars:   two bars of different heights -> "Which bar is taller, the left one or the right one?" answer left/right

Each record has the question, the reference `answer` (for GRPO) and a `response` in the
<think>…</think><answer>…</answer> format (for SFT). The files in this folder were made by

    python examples/shapes/make_shapes.py

and the tests regenerate them into a temporary folder and compare (decoded pixels and JSONL), so the committed
copy is always what this script makes. Nothing is written outside --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

SIZE = 84  # pixels; the tiny recipes' image budget turns it into 3 × 3 visual tokens
COLOURS = {"red": (215, 40, 40), "blue": (40, 80, 215), "green": (30, 160, 60), "yellow": (230, 200, 30)}
BACKGROUND = (246, 246, 240)
CELLS = [(r, c) for r in range(3) for c in range(3)]  # a 3 × 3 grid, one shape per cell at most


def _cell_box(cell, rng: random.Random, size: int = 18):
    r, c = cell
    x0 = c * 28 + rng.randint(2, 28 - size - 2)
    y0 = r * 28 + rng.randint(2, 28 - size - 2)
    return (x0, y0, x0 + size, y0 + size)


def _count(rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    n = rng.randint(1, 4)
    distractors = rng.randint(0, 2)
    cells = rng.sample(CELLS, n + distractors)
    for i, cell in enumerate(cells):
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        box = _cell_box(cell, rng)
        (draw.ellipse if i < n else draw.rectangle)(box, fill=colour)
    word = "circle" if n == 1 else "circles"
    return img, "How many circles are there?", str(n), f"I count the circles in the image: {n} {word}."


def _colour(rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    names = sorted(COLOURS)
    square = rng.choice(names)
    others = [c for c in names if c != square]
    cells = rng.sample(CELLS, 3)
    draw.rectangle(_cell_box(cells[0], rng, 22), fill=COLOURS[square])
    for cell in cells[1:]:
        draw.ellipse(_cell_box(cell, rng), fill=COLOURS[rng.choice(others)])
    return img, "What colour is the square?", square, f"I look at the square in the image: it is {square}."


def _bars(rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    low, high = sorted(rng.sample(range(14, 76, 6), 2))
    taller = rng.choice(["left", "right"])
    heights = (high, low) if taller == "left" else (low, high)
    colour = COLOURS[rng.choice(sorted(COLOURS))]
    for x0, h in zip((14, 50), heights):
        draw.rectangle((x0, SIZE - 4 - h, x0 + 20, SIZE - 4), fill=colour)
    question = "Which bar is taller, the left one or the right one?"
    return img, question, taller, f"I compare the two bars in the image: the {taller} one is taller."


TASKS = (_count, _colour, _bars)


def make(out: str, n_train: int = 36, n_eval: int = 12, seed: int = 0) -> dict:
    """Write images/, train.jsonl and eval.jsonl into `out`; returns {split: path}."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    paths = {}
    index = 0
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            img, question, answer, thought = TASKS[i % len(TASKS)](rng)
            name = f"images/{index:03d}.png"
            img.save(os.path.join(out, name), optimize=True)
            rows.append(
                {
                    "id": f"{split}-{i:03d}",
                    "image": name,
                    "question": question,
                    "answer": answer,
                    "response": f"<think>{thought}</think><answer>{answer}</answer>",
                }
            )
            index += 1
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return paths


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=here, help="folder to write into (default: this script's folder)")
    p.add_argument("--train", type=int, default=36, help="training records")
    p.add_argument("--eval", type=int, default=12, help="held-out records")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train < 1 or args.eval < 0:
        sys.stderr.write(f"make_shapes: --train must be >= 1 and --eval >= 0, got {args.train} and {args.eval}\n")
        return 2
    for split, path in make(args.out, args.train, args.eval, args.seed).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
