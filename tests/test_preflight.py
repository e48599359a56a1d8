"""`avar-train check` and the checks every `avar-train` command runs first: each problem a careless user can make
is one line `WHERE: FIELD: REASON` before any model weights load (exit 2 for a setting, 1 for the data), and
what the README allows (negative layer indices, skipped bad records) runs.

Every run command here has its model loader replaced by one that fails the test, so "before the model loads" is
checked, not assumed."""

import importlib.util
import json
import os

import pytest
import torch
import yaml
from grpo_fixtures import write_colour_task
from sft_fixtures import tiny_pair, write_sft_records

import avar_train.grpo.trainer as grpo_trainer
import avar_train.sft.trainer as sft_trainer
from avar_ops.data import load_records
from avar_train.cli import main
from avar_train.data.collator import QwenVLCollator
from avar_train.preflight import LAUNCHER_ENV, TRACKERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_sft_records(str(tmp_path_factory.mktemp("sft")), n=4)


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory):
    return write_colour_task(str(tmp_path_factory.mktemp("grpo")), n=4)


def _recipe(folder, name, **values):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f)
    return path


@pytest.fixture
def sft_recipe(sft_data, tmp_path):
    return _recipe(
        str(tmp_path),
        "sft.yaml",
        model_name_or_path="tiny",
        train_file=sft_data,
        output_dir=str(tmp_path / "out"),
        max_length=256,
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        max_steps=1,
        per_device_train_batch_size=2,
    )


@pytest.fixture
def grpo_recipe(grpo_data, tmp_path):
    return _recipe(
        str(tmp_path),
        "grpo.yaml",
        model_name_or_path="tiny",
        train_file=grpo_data,
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        accuracy_checker="grpo_fixtures:contains_checker",
    )


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(sft_trainer, "load_model_and_processor", refuse)
    monkeypatch.setattr(grpo_trainer, "_load_model", refuse)


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _one_line(capsys, argv, code, field, *words, n=1):
    """The command's exit status is `code` and its output `n` lines (1: one problem), each naming `field`."""
    got, lines = _run(capsys, *argv)
    assert got == code, (got, lines)
    assert len(lines) == n, lines
    for line in lines:
        assert f": {field}: " in line and "Traceback" not in line, lines
        for w in words:
            assert w in line, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ SFT settings


SFT_BAD_SETTINGS = [
    ("num_train_epochs=.nan", "num_train_epochs", "finite"),
    ("num_train_epochs=.inf", "num_train_epochs", "finite"),
    ("adam_beta1=2", "adam_beta1", "[0, 1)"),
    ("adam_beta2=-0.5", "adam_beta2", "[0, 1)"),
    ("seed=-1", "seed", "2**32 - 1"),
    (f"seed={2**40}", "seed", "2**32 - 1"),
    ("data_seed=-3", "data_seed", "2**32 - 1"),
    ("dataloader_num_workers=-1", "dataloader_num_workers", "must be in [0, "),
    (f"dataloader_num_workers={2**40}", "dataloader_num_workers", "the CPUs here"),
    ("agto_layers=[99]", "agto_layers", "out of range for 3"),
    ("agto_layers=[-4]", "agto_layers", "out of range for 3"),
    ("save_total_limit=0", "save_total_limit", ">= 1"),
]


@pytest.mark.parametrize("command", ["sft", "check"])
@pytest.mark.parametrize("override,field,words", SFT_BAD_SETTINGS)
def test_sft_settings_are_one_line_before_the_model(capsys, no_model, sft_recipe, command, override, field, words):
    line = _one_line(capsys, [command, "--config", sft_recipe, override], 2, field, words)
    assert line.split(": error: ")[1].startswith("command line: ")


def test_a_setting_in_the_file_is_located_at_its_line(capsys, no_model, sft_recipe):
    with open(sft_recipe, encoding="utf-8") as f:
        text = f.read()
    with open(sft_recipe, "w", encoding="utf-8") as f:
        f.write(text + "adam_beta1: 2\nseed: -1\n")
    n = len(text.splitlines())
    code, lines = _run(capsys, "sft", "--config", sft_recipe)
    assert code == 2
    assert [line.split(": error: ")[1].split(": must")[0] for line in lines] == [
        f"{sft_recipe}:{n + 1}: adam_beta1",
        f"{sft_recipe}:{n + 2}: seed",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 without a GPU is the case under test")
def test_bf16_without_a_gpu(capsys, no_model, sft_recipe):
    _one_line(capsys, ["sft", "--config", sft_recipe, "bf16=true"], 2, "bf16", "use_cpu")


def test_tracker_that_is_not_installed(capsys, no_model, sft_recipe):
    missing = [name for name, mods in TRACKERS.items() if all(importlib.util.find_spec(m) is None for m in mods)]
    if not missing:
        pytest.skip("every tracker transformers knows is installed here")
    _one_line(capsys, ["sft", "--config", sft_recipe, f"report_to=[{missing[0]}]"], 2, "report_to", "not installed")
    _one_line(capsys, ["sft", "--config", sft_recipe, "report_to=[nosuchtracker]"], 2, "report_to", "unknown")


def test_deepspeed_without_a_launcher(capsys, no_model, sft_recipe, monkeypatch):
    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    zero2 = os.path.join(REPO, "training", "configs", "zero2.json")
    _one_line(capsys, ["sft", "--config", sft_recipe, f"deepspeed={zero2}"], 2, "deepspeed")


def test_relative_deepspeed_file_of_an_accelerate_config_outside_its_folder(capsys, no_model, sft_recipe, tmp_path):
    # What `accelerate launch --config_file training/configs/accelerate_zero2.yaml` passes on to each process.
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        mp.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "training/configs/zero2.json")
        mp.chdir(tmp_path)
        code, lines = _run(capsys, "sft", "--config", sft_recipe)
    finally:
        mp.undo()
    assert code == 2 and len(lines) == 1, lines
    assert "deepspeed" in lines[0] and ("working folder" in lines[0] or "not installed" in lines[0]), lines


def test_model_folder_without_weights(capsys, no_model, sft_recipe, tmp_path):
    folder = tmp_path / "no_weights"
    model, processor = tiny_pair()
    model.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    _one_line(
        capsys, ["sft", "--config", sft_recipe, f"model_name_or_path={folder}"], 2, "model_name_or_path", "weights"
    )


def test_all_problems_are_reported_together(capsys, no_model, sft_recipe):
    code, lines = _run(capsys, "check", "--config", sft_recipe, "adam_beta1=2", "seed=-1", "agto_layers=[7]")
    assert code == 2 and len(lines) == 3, lines


# ---------------------------------------------------------------------------------------------------- records


def _write(path, rows, extra: bytes = b""):
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        f.write(extra)
    return str(path)


def _sft_rows(sft_data):
    with open(sft_data, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _with_images(sft_data, tmp_path, rows, name="train.jsonl"):
    """rows written next to the fixture's images (their relative paths stay valid)."""
    return _write(os.path.join(os.path.dirname(sft_data), name), rows)


def test_non_utf8_record_is_one_line(capsys, no_model, sft_recipe, sft_data, tmp_path):
    bad = _with_images(sft_data, tmp_path, _sft_rows(sft_data), "latin1.jsonl")
    with open(bad, "ab") as f:
        f.write(b'{"id": "x", "question": "caf\xe9?", "response": "Oui."}\n')
    line = _one_line(capsys, ["sft", "--config", sft_recipe, f"train_file={bad}"], 1, "record", "not UTF-8", "0xe9")
    assert f"{bad}:5:" in line


def test_extreme_aspect_ratio_image(capsys, no_model, sft_recipe, sft_data, tmp_path):
    from PIL import Image

    folder = os.path.dirname(sft_data)
    Image.new("RGB", (600, 2), (200, 0, 0)).save(os.path.join(folder, "strip.png"))
    rows = [{"id": "s", "image": "strip.png", "question": "What colour?", "response": "Red."}]
    path = _with_images(sft_data, tmp_path, rows, "strip.jsonl")
    _one_line(capsys, ["sft", "--config", sft_recipe, f"train_file={path}"], 1, "record", "600×2", "200:1")


def test_text_only_sft_record_names_agto_empty(capsys, no_model, sft_recipe, sft_data, tmp_path):
    rows = _sft_rows(sft_data)[:2] + [{"id": "t", "question": "What is 2 + 3?", "response": "5."}]
    path = _with_images(sft_data, tmp_path, rows, "text_only.jsonl")
    line = _one_line(capsys, ["sft", "--config", sft_recipe, f"train_file={path}"], 1, "agto_empty", "'t'")
    assert "empty=" not in line and f"{path}:3:" in line
    code, lines = _run(capsys, "check", "--config", sft_recipe, f"train_file={path}", "agto_empty=skip")
    assert code == 0 and not lines


def test_max_length_that_cuts_an_image(capsys, no_model, sft_recipe, sft_data):
    code, lines = _run(capsys, "sft", "--config", sft_recipe, "max_length=20")
    assert code == 1 and len(lines) == 4, lines  # one line per record, each at its line of the file
    for i, line in enumerate(lines, start=1):
        assert f"{sft_data}:{i}: max_length: " in line and "would cut an image" in line


def test_measure_equals_the_encoded_batch(sft_data):
    """The up-front measure (tokenizer + image sizes) counts what the collator encodes, for both modes and for
    images of several sizes."""
    from PIL import Image

    folder = os.path.dirname(sft_data)
    sizes = [(56, 56), (300, 90), (17, 400), (640, 480)]
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 40, 90, 200)).save(os.path.join(folder, f"m{i}.png"))
        rows.append({"id": f"m{i}", "image": f"m{i}.png", "question": "Describe it." * (i + 1), "response": "A box."})
    records = load_records(_write(os.path.join(folder, "sizes.jsonl"), rows), use="sft").records
    for mode in ("sft", "prompt"):
        for lo, hi in ((56 * 56, 112 * 112), (28 * 28, 448 * 448)):
            collator = QwenVLCollator(tiny_pair()[1], max_length=4096, min_pixels=lo, max_pixels=hi, mode=mode)
            for record in records:
                batch = collator([record])
                m = collator.measure(record)
                assert m.length == batch["input_ids"].shape[1], (mode, record.id)
                vision = batch["image_mask"][0].nonzero().max().item()
                assert m.last_vision == vision + 1  # the <|vision_end|> after the last pad
                assert m.has_image and m.has_system and m.has_user


def test_skip_bad_records_skips_with_a_reject_and_negative_agto_layers_train(capsys, sft_recipe, sft_data, tmp_path):
    bad = _with_images(sft_data, tmp_path, _sft_rows(sft_data), "skip.jsonl")
    with open(bad, "ab") as f:
        f.write(b'{"id": "x", "question": "caf\xe9?", "response": "Oui."}\n')
    out = tmp_path / "run"
    argv = ["sft", "--config", sft_recipe, f"train_file={bad}", f"output_dir={out}"]
    code, lines = _run(capsys, *argv, "skip_bad_records=true", "agto_layers=[-1]")
    assert code == 0, lines
    assert len(lines) >= 1 and "skipped" in lines[0] and "not UTF-8" in lines[0]
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl", encoding="utf-8")]
    assert [(r["line"], "not UTF-8" in r["reason"]) for r in rejects] == [(5, True)]
    log = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    assert any(row.get("step") == 1 and "loss_lm" in row for row in log)


def test_negative_agto_layers_select_from_the_end(tmp_path, sft_data):
    from avar_ops.hf import apply_to_qwen2_5_vl, revert
    from avar_train.sft.config import SFTConfig

    model, processor = tiny_pair()
    apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        cfg = SFTConfig(train_file=sft_data, output_dir=str(tmp_path), max_steps=1).validate()
        for layers, want in (([-1], [2]), ([0, -1], [0, 2]), ([-3, 1], [0, 1]), (None, [0, 1, 2])):
            trainer = sft_trainer.AGTOTrainer(
                model=model, args=sft_trainer.training_arguments(cfg), agto=sft_trainer.AGTOSettings(layers=layers)
            )
            assert trainer._layers == want, layers
    finally:
        revert(model)


# -------------------------------------------------------------------------------------------------------- GRPO


GRPO_BAD_SETTINGS = [
    ("reward_funcs=[no_such_module_xyz:f]", 2, "reward_funcs", "cannot import", 1),
    ("accuracy_checker=grpo_fixtures:no_such_function", 2, "accuracy_checker", "no callable", 1),
    ("per_device_train_batch_size=10", 2, "per_device_train_batch_size", "holds 4 usable records", 1),
    ("visual_layers=[5]", 2, "visual_layers", "out of range for 3", 1),
    ("max_prompt_length=12", 1, "max_prompt_length", "never cut", 4),  # one line per record
    ("seed=-1", 2, "seed", "2**32 - 1", 1),
]


@pytest.mark.parametrize("command", ["grpo", "check"])
@pytest.mark.parametrize("override,code,field,words,n", GRPO_BAD_SETTINGS)
def test_grpo_problems_are_one_line_before_the_model(
    capsys, no_model, grpo_recipe, command, override, code, field, words, n
):
    _one_line(capsys, [command, "--config", grpo_recipe, override], code, field, words, n=n)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_one_generation_is_refused_whatever_the_scaling(capsys, no_model, grpo_recipe, scale):
    argv = [
        "grpo",
        "--config",
        grpo_recipe,
        "num_generations=1",
        "per_device_train_batch_size=2",
        f"scale_rewards={scale}",
    ]
    _one_line(capsys, argv, 2, "num_generations", ">= 2")


def test_grpo_prompt_longer_than_the_context(capsys, no_model, grpo_recipe):
    argv = ["grpo", "--config", grpo_recipe, "max_completion_length=4090"]
    _one_line(capsys, argv, 1, "max_completion_length", "context of 4096", n=4)


def test_check_accepts_negative_visual_layers(capsys, grpo_recipe):
    code, lines = _run(capsys, "check", "--config", grpo_recipe, "visual_layers=[-1, 0]")
    assert code == 0 and not lines


def test_check_needs_the_trainer_when_the_keys_do_not_tell(capsys, tmp_path, sft_data):
    path = _recipe(str(tmp_path), "both.yaml", train_file=sft_data, output_dir=str(tmp_path / "o"))
    code, lines = _run(capsys, "check", "--config", path)
    assert code == 2 and len(lines) == 1 and "--command" in lines[0]
    code, lines = _run(capsys, "check", "--config", path, "--command", "sft")
    assert code == 0 and not lines


def test_a_reward_function_that_raises_is_one_line(capsys, grpo_recipe):
    code, lines = _run(capsys, "grpo", "--config", grpo_recipe, "reward_funcs=[grpo_fixtures:raising_reward]")
    errors = [line for line in lines if "error:" in line]  # the others are the progress bar's
    assert code == 1 and len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    assert errors[0].endswith(
        "avar-train grpo: error: reward function 'grpo_fixtures:raising_reward' raised KeyError: 'score'"
    )


def test_vard_recipe_and_input_are_checked(capsys, tmp_path, sft_data):
    bad = _with_images(sft_data, tmp_path, _sft_rows(sft_data)[:2], "vard_in.jsonl")
    with open(bad, "ab") as f:
        f.write(b'{"id": "x", "question": "caf\xe9?"}\n')
    path = _recipe(
        str(tmp_path), "vard.yaml", input_file=bad, output_dir=str(tmp_path / "v"), generator="http", model="m"
    )
    code, lines = _run(capsys, "check", "--config", path, "base_url=localhost:8000")
    assert code == 2 and len(lines) == 2, lines  # the setting and the record, each in its line
    assert "command line: base_url: must be an http(s) URL" in lines[0] and f"{bad}:3: record: not UTF-8" in lines[1]
    code, lines = _run(capsys, "vard", "--config", path, "base_url=http://127.0.0.1:9/v1", "max_retries=-1")
    assert code == 2 and len(lines) == 2 and "max_retries" in lines[0], lines


def test_negative_visual_layers_train(grpo_data, tmp_path):
    """visual_layers=[-1] is the last layer (−n ≤ i < n): a GRPO step runs and r_visual averages that layer only."""
    from grpo_fixtures import contains_checker

    from avar_ops.analysis import build_tiny_qwen2_5_vl
    from avar_train.grpo.config import load_grpo_config
    from avar_train.grpo.rewards import accuracy_reward

    values = dict(train_file=grpo_data, output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2)
    values.update(max_completion_length=4, max_steps=1)
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    trainer = grpo_trainer.GRPOTrainer(
        load_grpo_config(None, {**values, "visual_layers": [-1, 0]}),
        model,
        processor,
        accuracy=accuracy_reward(contains_checker),
    )
    assert trainer.visual_layers == [0, 2]
    record = trainer.train_step()
    assert record["step"] == 1 and record["r_visual_raw"] == record["r_visual_raw"]  # a number, not NaN


def test_max_steps_zero_trains_the_epochs(capsys, sft_recipe, tmp_path):
    """max_steps <= 0 means "by num_train_epochs" (found by the fuzz test: 0 used to stop after one step at
    epoch 0.5 with exit status 0)."""
    out = tmp_path / "epochs"
    code, lines = _run(capsys, "sft", "--config", sft_recipe, "max_steps=0", f"output_dir={out}")
    assert code == 0, lines
    with open(out / "trainer_state.json", encoding="utf-8") as f:
        state = json.load(f)
    assert state["global_step"] == state["max_steps"] == 2  # 4 records, 2 per step, 1 epoch


def test_a_tiny_family_in_a_recipe_is_not_a_path(capsys, sft_data, tmp_path):
    """`model_name_or_path: tiny:FAMILY` in a recipe file names a tiny model (not a folder next to the file); a
    pixel budget for a processor without one is refused naming min_pixels; a family whose template adds no
    system prompt is told to give one."""
    base = dict(train_file=sft_data, output_dir=str(tmp_path / "out"), max_steps=1, max_length=1024)
    ok = _recipe(str(tmp_path), "ok.yaml", model_name_or_path="tiny:llava_onevision", agto_empty="skip", **base)
    assert _run(capsys, "check", "--command", "sft", "--config", ok) == (0, [])
    bad = _recipe(str(tmp_path), "bad.yaml", model_name_or_path="tiny:llava_onevision", min_pixels=3136, **base)
    _one_line(capsys, ["check", "--command", "sft", "--config", bad], 2, "min_pixels", "has no pixel budget")
    unknown = _recipe(str(tmp_path), "unknown.yaml", model_name_or_path="tiny:gemma3", **base)
    _one_line(capsys, ["check", "--command", "sft", "--config", unknown], 2, "model_name_or_path", "'gemma3'")
    shapes = os.path.join(REPO, "examples", "shapes", "train.jsonl")  # some records have no system prompt
    glm = _recipe(str(tmp_path), "glm.yaml", model_name_or_path="tiny:glm4v", **{**base, "train_file": shapes})
    code, lines = _run(capsys, "check", "--command", "sft", "--config", glm)
    assert code == 1 and lines and all("give it a system prompt (this chat template adds none)" in x for x in lines)
