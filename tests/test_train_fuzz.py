"""Fuzzing `avar-train sft` and `avar-train grpo`: random mutations of a valid tiny recipe and record file (wrong
types, out-of-range numbers, missing files, bad bytes, chat-template markers, huge text, broken images), drawn
from fixed seeds. The property, for every mutation: the command either answers with problem lines
(`avar-train CMD: error: …`, no traceback) before the model loads, or completes every step it was asked for."""

import copy
import json
import os
import random

import pytest
import yaml
from grpo_fixtures import write_colour_task
from sft_fixtures import tiny_pair, write_sft_records

import avar_train.grpo.trainer as grpo_trainer
import avar_train.sft.trainer as sft_trainer
from avar_train.cli import main

BAD_VALUES = ["abc", [1, "x"], {"a": 1}, True, None, -1, 0, 1e30, float("nan"), float("-inf"), 2**70, [99], [-1], []]
# Keys whose valid values decide how long a run takes: mutated only within cheap bounds (a careless value that
# is merely large, e.g. max_steps=10**9, is a long run, not a bad input).
BOUNDED = {
    "max_steps": [-1, 0, 2, "abc", None, 1.5],
    "num_train_epochs": [0, -1, 2, float("nan"), float("inf"), "x"],
    "per_device_train_batch_size": [0, -2, 3, "abc", 1.5],
    "gradient_accumulation_steps": [0, 2, "x", None],
    "num_generations": [0, 1, 3, "x"],
    "max_completion_length": [0, -1, 4097, 2, "x"],
    "num_iterations": [0, 2, "x"],
    "max_new_tokens": [0],
}
SFT_KEYS = [
    "model_name_or_path", "train_file", "max_length", "min_pixels", "max_pixels", "alpha", "beta", "agto_eps",
    "agto_layers", "agto_empty", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm",
    "lr_scheduler_type", "warmup_ratio", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "bf16", "seed", "data_seed", "dataloader_num_workers", "logging_steps",
    "save_steps", "save_total_limit", "report_to", "deepspeed", "skip_bad_records", "ddp_backend", "no_such_key",
]  # fmt: skip
GRPO_KEYS = [
    "model_name_or_path", "train_file", "max_prompt_length", "seed", "learning_rate", "adam_beta1", "max_steps",
    "per_device_train_batch_size", "num_generations", "temperature", "top_p", "top_k", "max_completion_length",
    "num_iterations", "epsilon", "beta", "loss_type", "scale_rewards", "lambda_visual", "visual_layers",
    "reward_funcs", "accuracy_checker", "reward_weights", "report_to", "min_pixels", "max_pixels", "no_such_key",
]  # fmt: skip


def _record_mutation(rng: random.Random, rows: list, folder: str):
    """Apply one random damage to the records (rows of dicts, or raw bytes for a line); returns its name."""
    i = rng.randrange(len(rows))
    kind = rng.choice(
        [
            "bytes",
            "marker",
            "huge",
            "long",
            "missing_image",
            "corrupt_image",
            "json",
            "duplicate",
            "narrow",
            "text_only",
        ]
        + ["id_type", "question_type"]
    )
    row = rows[i]
    if kind == "bytes":
        rows[i] = json.dumps(row).encode().replace(b"?", b"\xff?", 1) if isinstance(row, dict) else row + b"\xfe"
    elif isinstance(row, bytes):
        return _record_mutation(rng, rows, folder)
    elif kind == "marker":
        row["question"] += rng.choice([" <|im_start|>system", " <|image_pad|>", "<|vision_end|>"])
    elif kind == "huge":
        row["question"] = "a" * 1_100_000
    elif kind == "long":
        row["question"] = "count the dots " * rng.choice([300, 3000])
    elif kind == "missing_image":
        row["image"] = "nowhere.png"
    elif kind == "corrupt_image":
        with open(os.path.join(folder, "corrupt.png"), "wb") as f:
            f.write(b"this is not a PNG")
        row["image"] = "corrupt.png"
    elif kind == "json":
        rows[i] = b'{"id": "broken", "question": '
    elif kind == "duplicate":
        rows.append(copy.deepcopy(row))
    elif kind == "narrow":
        from PIL import Image

        Image.new("RGB", (900, 3), (10, 200, 10)).save(os.path.join(folder, "narrow.png"))
        row["image"] = "narrow.png"
    elif kind == "text_only":
        row.pop("image", None)
    elif kind == "id_type":
        row["id"] = rng.choice([[1], None, True, ""])
    else:
        row["question"] = rng.choice([5, None, "", ["q"]])
    return kind


def _write_rows(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            f.write((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n")


def _mutate(rng, base: dict, keys, data_file: str, folder: str):
    """A recipe and a data file with 1–2 random damages; returns (recipe dict, overrides, data path, what)."""
    recipe, overrides, what = dict(base), [], []
    with open(data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    damaged = False
    for _ in range(rng.choice([1, 1, 2])):
        if rng.random() < 0.35:
            what.append("record:" + _record_mutation(rng, rows, folder))
            damaged = True
            if rng.random() < 0.5:
                recipe["skip_bad_records"] = True
                what.append("skip_bad_records")
            continue
        key = rng.choice(keys)
        value = rng.choice(BOUNDED.get(key, BAD_VALUES))
        what.append(f"{key}={value!r}")
        if rng.random() < 0.5:
            recipe[key] = value
        else:
            overrides.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    path = data_file
    if damaged:
        path = os.path.join(folder, f"mutated_{rng.randrange(10**9)}.jsonl")
        _write_rows(path, rows)
    return recipe, overrides, path, ", ".join(what)


def _check_outcome(command, code, err, loaded, out_dir, max_steps, what):
    lines = [line for line in err.splitlines() if line.startswith("avar-train")]
    assert "Traceback" not in err, (what, err[-2000:])
    if code != 0:
        assert not loaded, (what, "an error after the model loaded", err[-1000:])
        errors = [line for line in lines if f"avar-train {command}: error: " in line]
        assert errors, (what, code, err[-1000:])
        assert all(line.startswith(f"avar-train {command}: ") for line in lines), (what, lines)
        return "error"
    if command == "sft":  # Trainer's own account: the steps it planned (from max_steps or the epochs) and ran
        with open(os.path.join(out_dir, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        assert state["global_step"] == state["max_steps"] > 0, (what, state["global_step"], state["max_steps"])
    else:
        with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
            steps = [json.loads(line).get("step") for line in f]
        assert steps and steps[-1] == max_steps, (what, steps)
    return "completed"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_pair()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def _fuzz(command, seed, n, base, keys, data_file, tmp_path, monkeypatch, capfd):
    loads = []
    for name, module in (("load_model_and_processor", sft_trainer), ("_load_model", grpo_trainer)):
        original = getattr(module, name)

        def counted(*args, _original=original, **kwargs):
            loads.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    rng = random.Random(seed)
    outcomes = []
    for k in range(n):
        folder = os.path.dirname(data_file)
        recipe, overrides, path, what = _mutate(rng, base, keys, data_file, folder)
        out_dir = str(tmp_path / f"run{k}")
        recipe.setdefault("output_dir", out_dir)
        recipe["output_dir"] = out_dir
        if recipe.get("train_file") == base["train_file"]:
            recipe["train_file"] = path
        cfg_path = str(tmp_path / f"recipe{k}.yaml")
        with open(cfg_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(recipe, f)
        loads.clear()
        try:
            code = main([command, "--config", cfg_path, *overrides])
        except SystemExit as exc:  # argparse's own one-line errors
            code = exc.code
        err = capfd.readouterr().err
        max_steps = recipe.get("max_steps", 1)
        for o in overrides:
            if o.startswith("max_steps="):
                max_steps = yaml.safe_load(o.split("=", 1)[1])
        outcomes.append(_check_outcome(command, code, err, bool(loads), out_dir, max_steps, what))
    return outcomes


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_sft(seed, tiny_dir, tmp_path, monkeypatch, capfd):
    data = write_sft_records(str(tmp_path / "data"), n=4)
    base = dict(
        model_name_or_path=tiny_dir,
        train_file=data,
        max_length=256,
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        max_steps=1,
        per_device_train_batch_size=2,
        logging_steps=1,
    )
    outcomes = _fuzz("sft", seed, 14, base, SFT_KEYS, data, tmp_path, monkeypatch, capfd)
    assert "error" in outcomes  # the mutations do find problems (the property is checked per mutation above)


@pytest.mark.parametrize("seed", [0])
def test_fuzz_grpo(seed, tiny_dir, tmp_path, monkeypatch, capfd):
    data = write_colour_task(str(tmp_path / "data"), n=4)
    base = dict(
        model_name_or_path=tiny_dir,
        train_file=data,
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        accuracy_checker="grpo_fixtures:contains_checker",
    )
    outcomes = _fuzz("grpo", seed, 12, base, GRPO_KEYS, data, tmp_path, monkeypatch, capfd)
    assert "error" in outcomes
