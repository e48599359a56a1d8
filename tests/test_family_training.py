"""Training on every family's tiny model, through the same code as Qwen2.5-VL: a few AGTO steps raise the user
tokens' image mass (and beat L_LM alone) over several seeds; the SFT trainer (`train_sft`, collator, checks) runs
end to end and saves a model that loads; one GRPO step runs and logs finite numbers."""

import json
import os

import pytest
import torch
from grpo_fixtures import hash_checker, write_colour_task

from avar_ops.analysis.tiny_families import build_tiny, tiny_family_names
from avar_ops.analysis.tiny_qwen import synthetic_images
from avar_ops.data.samples import build_inputs
from avar_ops.hf import apply, collect_masses, family_of, load_pretrained, revert, token_groups
from avar_ops.method import agto_losses, vas
from avar_train.grpo.config import load_grpo_config
from avar_train.grpo.rewards import accuracy_reward
from avar_train.grpo.trainer import GRPOTrainer
from avar_train.sft.config import SFTConfig
from avar_train.sft.trainer import train_sft

FAMILIES = tiny_family_names()
SEEDS = (0, 1, 2)
STEPS, LR, ALPHA, BETA = 6, 1e-3, 0.15, 0.15
SAMPLES = [
    ("What colour is the square?", "You are a careful visual reasoning assistant.", "The square is red."),
    ("How many circles are there in the picture?", "Answer briefly.", "There are two circles."),
]


def _history(family, seed, alpha, beta):
    model, processor = build_tiny(family, seed=seed)
    model.train()
    fam = family_of(model)
    vision = {id(p) for m in fam.vision_modules(fam.base_model(model)) for p in m.parameters()}
    apply(model, processor)
    try:
        images = synthetic_images(len(SAMPLES), seed=seed + 3)
        samples = [
            {"id": f"s{i}", "images": [img], "question": q, "system": s}
            for i, ((q, s, _), img) in enumerate(zip(SAMPLES, images))
        ]
        inputs = build_inputs(processor, samples, responses=[a for _, _, a in SAMPLES])
        groups = token_groups(inputs["input_ids"], processor, inputs["attention_mask"])
        labels = inputs["input_ids"].masked_fill(~groups.response_mask, -100)  # [B, L]
        decoder = [p for p in model.parameters() if id(p) not in vision]
        opt = torch.optim.AdamW(decoder, lr=LR, weight_decay=0.0)
        history = []
        for step in range(STEPS + 1):
            with collect_masses(model) as rec:
                out = model(**inputs, labels=labels)
            enhance, suppress = agto_losses(rec.masses, groups.user_mask, groups.image_mask, groups.system_mask)
            res = vas([m.detach() for m in rec.masses], groups.user_mask)
            history.append(float(res.image_mass.overall))
            if step == STEPS:
                break
            opt.zero_grad()
            (out.loss + alpha * enhance + beta * suppress).backward()
            opt.step()
    finally:
        revert(model)
    return history


@pytest.mark.parametrize("family", FAMILIES)
def test_agto_steps_raise_image_mass(family):
    """In every seed, AGTO ends with a higher user image mass than it started with and than L_LM alone ends."""
    per_seed = {}
    for seed in SEEDS:
        agto = _history(family, seed, ALPHA, BETA)
        lm_only = _history(family, seed, 0.0, 0.0)
        assert agto[0] == pytest.approx(lm_only[0], rel=1e-6), seed  # the two runs start from one point
        per_seed[seed] = (agto[0], agto[-1], lm_only[-1])
    for seed, (start, end, lm_end) in per_seed.items():
        assert end > start and end > lm_end, f"{family} seed {seed}: {per_seed}"


def _sft_records(folder):
    images = synthetic_images(4, seed=5)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "sft.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, img in enumerate(images):
            rel = os.path.join("images", f"i{i}.png")
            img.save(os.path.join(folder, rel))
            q, s, a = SAMPLES[i % 2]
            f.write(json.dumps({"id": f"r{i}", "image": rel, "question": q, "system": s, "response": a}) + "\n")
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_trainer_runs_and_saves(family, tmp_path):
    data = _sft_records(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    cfg = SFTConfig(
        model_name_or_path=f"tiny:{family}",
        train_file=data,
        output_dir=out,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_length=1024,
        logging_steps=1,
    ).validate()
    train_sft(cfg)
    logged = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    model = load_pretrained(out)
    assert family_of(model).name == family


@pytest.mark.parametrize("family", FAMILIES)
def test_one_grpo_step(family, tmp_path):
    data = write_colour_task(str(tmp_path / "colour"), n=4)
    cfg = load_grpo_config(
        None,
        dict(
            model_name_or_path=f"tiny:{family}",
            train_file=data,
            output_dir=str(tmp_path / "run"),
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=6,
            learning_rate=1e-3,
            seed=0,
        ),
    )
    model, processor = build_tiny(family, seed=0)
    trainer = GRPOTrainer(cfg, model, processor, accuracy=accuracy_reward(hash_checker))
    history = trainer.train()
    assert [r["step"] for r in history] == [1]
    rec = history[0]
    for key in ("loss", "reward", "r_visual_raw", "response_image_mass", "prompt_vas"):
        assert isinstance(rec[key], float) and rec[key] == rec[key], (key, rec[key])
    assert rec["response_image_mass"] > 0
