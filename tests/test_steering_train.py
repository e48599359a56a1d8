"""`avar-train steer` on the tiny Qwen2.5-VL: only the tables move (every model weight bit-identical after the
steps), masks and only-β hold the other entries exactly, bounds hold, checkpoints are steering files and a
resumed run ends where an uninterrupted one does; the recipe's bad values are refused in one line before a
model loads; and the trained file runs through `avar generate / vas / sweep / eval --steer`."""

import json
import os

import pytest
import torch
from sft_fixtures import tiny_pair, write_sft_records

from avar_ops.hf import load_steering
from avar_train.cli import main as train_main
from avar_train.steer.config import SteerConfig
from avar_train.steer.trainer import STEERING_FILE, train_steer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_pair()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_sft_records(str(tmp_path_factory.mktemp("data")), n=4)


def _config(tiny_dir, train_file, output_dir, **overrides):
    values = dict(
        model_name_or_path=tiny_dir,
        train_file=train_file,
        output_dir=str(output_dir),
        max_length=256,
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        learning_rate=0.05,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        max_steps=4,
        per_device_train_batch_size=2,
    )
    values.update(overrides)
    return SteerConfig(**values).validate()


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("avar_steering")}


@pytest.mark.parametrize("seed", [0, 1])
def test_only_the_tables_move(tiny_dir, train_file, tmp_path, seed):
    """After the steps every model weight is bit-identical to the checkpoint's, while the tables moved; the
    steering file holds the trained tables."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    trainer = train_steer(_config(tiny_dir, train_file, tmp_path, seed=seed, data_seed=seed))
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).state_dict()
    after = _weights(trainer.model)
    assert after and set(after) <= set(before)
    for name, value in after.items():
        assert torch.equal(value, before[name]), name
        assert not trainer.model.get_parameter(name).requires_grad
    tables = trainer.tables
    assert tables.bias.abs().max() > 1e-3 and (tables.logit_scale - 1).abs().max() > 1e-3
    saved = load_steering(os.path.join(tmp_path, STEERING_FILE))
    assert torch.equal(saved.bias, tables.bias.detach()) and torch.equal(saved.logit_scale, tables.logit_scale.detach())
    assert saved.trained["trainer"] == "avar-train steer" and saved.trained["step"] == 4
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable == ["avar_steering.bias", "avar_steering.logit_scale"]


def test_masks_only_bias_and_bounds_hold(tiny_dir, train_file, tmp_path):
    """Entries outside steer_layers × steer_heads × steer_groups stay at their initial value exactly (here the
    paper's α_img = 0.15), γ stays put with train_logit_scale false, and |β| never leaves max_abs_bias."""
    import math

    cfg = _config(
        tiny_dir,
        train_file,
        tmp_path,
        steer_layers=[-1],
        steer_heads=[0, 2],
        steer_groups=["visual", "system"],
        train_logit_scale=False,
        init_img=0.15,
        max_abs_bias=0.2,
        learning_rate=0.2,
    )
    trainer = train_steer(cfg)
    bias, scale = trainer.tables.bias.detach(), trainer.tables.logit_scale.detach()
    init = torch.zeros_like(bias)
    init[..., 1] = math.log1p(0.15)
    moves = torch.zeros_like(bias, dtype=torch.bool)
    for h in (0, 2):
        for g in (1, 2):
            moves[-1, h, g] = True
    assert torch.equal(bias[~moves], init[~moves])
    assert (bias[moves] != init[moves]).all()
    assert torch.equal(scale, torch.ones_like(scale))
    assert bias.abs().max() <= 0.2 and bool((bias[moves].abs() == 0.2).any())  # the bound was reached and held
    assert trainer.tables.num_trainable() == 4


def test_resume_ends_where_an_uninterrupted_run_does(tiny_dir, train_file, tmp_path):
    whole = tmp_path / "whole"
    train_steer(_config(tiny_dir, train_file, whole, save_steps=2))
    names = sorted(os.listdir(whole / "checkpoint-2"))
    assert STEERING_FILE in names and "optimizer.pt" in names and not any("model" in n for n in names)
    resumed = tmp_path / "resumed"
    train_steer(
        _config(tiny_dir, train_file, resumed, save_steps=2, resume_from_checkpoint=str(whole / "checkpoint-2"))
    )
    a, b = load_steering(str(whole / STEERING_FILE)), load_steering(str(resumed / STEERING_FILE))
    started = load_steering(str(whole / "checkpoint-2" / STEERING_FILE))
    assert not torch.equal(started.bias, a.bias)  # the resumed steps did something
    torch.testing.assert_close(b.bias, a.bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.logit_scale, a.logit_scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weight_decay=0.1", "weight_decay: must be 0 for steering"),
        ("deepspeed=training/configs/zero2.json", "deepspeed: steering trains only the tables"),
        ("steer_groups=[image]", "steer_groups: must be null or a non-empty list of ['other', 'visual'"),
        ("steer_layers=[7]", "steer_layers:"),
        ("steer_heads=[4]", "steer_heads:"),
        ("init_mode=scale", "init_mode: must be one of weights, logits, bias"),
        ("init_img=-1.5", "init_img: Intervention.alpha_img"),
        ("logit_scale_max=0.0", "logit_scale_max: must be a finite number above logit_scale_min"),
        ("max_abs_bias=0", "max_abs_bias: must be > 0"),
        ("init_steering=nothing.safetensors", "init_steering: no such file"),
        ("freeze_vision_tower=false", "freeze_vision_tower: steering freezes every model weight"),
        (
            "init_img=0.15 max_abs_bias=0.1",
            "init_img: the initial tables of weights α_img=0.15 α_sys=0 have |β| up to 0.1398, above max_abs_bias",
        ),
        ("init_mode=logits init_img=4", "have γ in [1, 5], outside [logit_scale_min, logit_scale_max] = [0.0, 4.0]"),
    ],
)
def test_bad_recipe_values_are_one_line(tmp_path, train_file, capsys, override, expected):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if override.startswith("deepspeed="):
        override = "deepspeed=" + os.path.join(root, override.split("=", 1)[1])
    argv = [
        "steer",
        "--config",
        os.path.join(root, "training/configs/steer_tiny.yaml"),
        f"train_file={train_file}",
        f"output_dir={tmp_path / 'out'}",
        *override.split(),
    ]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert all(line.startswith("avar-train steer: error: ") for line in err.strip().splitlines()), err
    assert not os.path.exists(tmp_path / "out")


def test_init_steering_for_another_model_is_refused(tmp_path, train_file, capsys):
    from avar_ops.hf import save_steering

    path = str(tmp_path / "other.safetensors")
    save_steering(path, torch.zeros(2, 4, 4), torch.ones(2, 4, 4), model_type="qwen2_5_vl", num_layers=2, num_heads=4)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["steer", "--config", os.path.join(root, "training/configs/steer_tiny.yaml")]
    argv += [f"train_file={train_file}", f"output_dir={tmp_path / 'out'}", f"init_steering={path}"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "was made for qwen2_5_vl with 2 layers × 4 heads, but this model is qwen2_5_vl with 3 layers" in err
    wide = str(tmp_path / "wide.safetensors")
    bias = torch.zeros(3, 4, 4)
    bias[2, 1, 1] = 12.0
    save_steering(wide, bias, torch.ones(3, 4, 4), model_type="qwen2_5_vl", num_layers=3, num_heads=4)
    assert train_main(argv[:-1] + [f"init_steering={wide}"]) == 2
    err = capsys.readouterr().err
    assert "init_steering: its tables have |β| up to 12, above max_abs_bias=10.0" in err, err


def test_check_tells_steer_and_sft_recipes_apart(tmp_path, train_file, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for recipe, command in (("steer_tiny.yaml", "steer"), ("sft_tiny.yaml", "sft")):
        argv = ["check", "--config", os.path.join(root, "training/configs", recipe), f"train_file={train_file}"]
        assert train_main(argv + [f"output_dir={tmp_path / command}"]) == 0
        assert f"avar-train check: {command} recipe" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def steered(tmp_path_factory, train_file):
    """A steering file trained by the command on the embedded tiny model, with a held-out evaluation."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("steer_cli") / "run"
    argv = ["steer", "--config", os.path.join(root, "training/configs/steer_tiny.yaml")]
    argv += [f"train_file={train_file}", f"eval_file={train_file}", f"output_dir={out}", "max_steps=3"]
    assert train_main(argv) == 0
    return str(out / STEERING_FILE)


def test_command_writes_file_and_logs(steered):
    folder = os.path.dirname(steered)
    with open(os.path.join(folder, "log.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss_lm" in r] == [1, 2, 3]
    assert any("eval_loss_lm" in r and "eval_image_mass" in r for r in rows)
    s = load_steering(steered)
    assert s.model_type == "qwen2_5_vl" and (s.num_layers, s.num_heads) == (3, 4)


def test_generate_vas_sweep_take_the_file(steered, tmp_path, capsys):
    from tiny_eager import write_jsonl

    from avar_ops.cli import main

    data = str(write_jsonl(tmp_path))
    image = json.loads(open(data, encoding="utf-8").readline())["images"][0]
    image = image if os.path.isabs(image) else os.path.join(os.path.dirname(data), image)
    args = ["--image", image, "--question", "What is shown?", "--max-new-tokens", "4", "--no-progress"]
    assert main(["generate", *args, "--steer", steered, "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "[no intervention]" in out and "[steering steering.safetensors (3 layers × 4 heads)]" in out

    assert main(["vas", "--data", data, "--limit", "2", "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    vas_args = ["vas", "--data", data, "--limit", "2", "--out", str(tmp_path / "vas"), "--no-progress"]
    assert main([*vas_args, "--steer", steered]) == 0
    with open(tmp_path / "vas" / "vas.json", encoding="utf-8") as f:
        report = json.load(f)
    with open(tmp_path / "plain" / "vas.json", encoding="utf-8") as f:
        plain = json.load(f)
    assert report["intervention"]["steering"] == steered and report["intervention"]["format"] == "avar-steering"
    assert report["image_mass"] != plain["image_mass"]

    sweep = ["sweep", "--data", data, "--limit", "2", "--alphas", "0", "0.15", "--no-progress"]
    assert main([*sweep, "--out", str(tmp_path / "sweep"), "--max-new-tokens", "3", "--steer", steered]) == 0
    with open(tmp_path / "sweep" / "sweep.json", encoding="utf-8") as f:
        rows = json.load(f)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["setting"] for r in rows][-1].startswith("steering ") and rows[-1]["mode"] == "steer"
    assert rows[-1]["image_mass"] == pytest.approx(report["image_mass"], rel=1e-5)


def test_eval_takes_the_file(steered, tmp_path):
    import eval_fixtures

    from avar_ops.cli import main

    bench = eval_fixtures.WRITERS["mmstar"](str(tmp_path / "mmstar"))
    out = str(tmp_path / "eval")
    argv = ["eval", "--model", "tiny", "--bench", "mmstar=" + bench, "--out", out, "--steer", steered]
    assert main([*argv, "--max-new-tokens", "2", "--no-progress", "--checker-timeout", "3"]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    assert settings["intervention"]["steering"] == steered


@pytest.mark.parametrize("command", ["generate", "vas", "sweep", "eval"])
def test_steer_flag_errors_before_loading(command, steered, tmp_path, capsys):
    """A missing file (exit 2), a file that is not a steering file (exit 1), one made for another model (exit 2),
    and --steer with hand-set values (exit 2): one line each, before any model loads."""
    from avar_ops.cli import main
    from avar_ops.hf import save_steering

    other = str(tmp_path / "other.safetensors")
    save_steering(other, torch.zeros(3, 8, 4), torch.ones(3, 8, 4), model_type="qwen2_5_vl", num_layers=3, num_heads=8)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("{}")
    base = {
        "generate": ["generate", "--image", "x.png", "--question", "q"],
        "vas": ["vas", "--data", "d.jsonl", "--out", str(tmp_path / "o")],
        "sweep": ["sweep", "--data", "d.jsonl", "--alphas", "0", "--out", str(tmp_path / "o")],
        "eval": ["eval", "--bench", "mmstar=b", "--out", str(tmp_path / "o")],
    }[command]
    from tiny_eager import write_jsonl

    data = str(write_jsonl(tmp_path))
    image = json.loads(open(data, encoding="utf-8").readline())["images"][0]
    image = image if os.path.isabs(image) else os.path.join(os.path.dirname(data), image)
    import eval_fixtures

    bench = eval_fixtures.WRITERS["mmstar"](str(tmp_path / "mmstar"))
    base = [{"x.png": image, "d.jsonl": data, "mmstar=b": "mmstar=" + bench}.get(a, a) for a in base]
    cases = [
        (["--steer", str(tmp_path / "absent.safetensors")], 2, "--steer: steering file not found"),
        (["--steer", str(junk)], 1, "not a readable safetensors file"),
        (["--steer", other], 2, "was made for qwen2_5_vl with 3 layers × 8 heads, but this model is"),
    ]
    if command != "sweep":
        cases.append((["--steer", steered, "--alpha-img", "0.15"], 2, "--steer sets every layer's and head's"))
        cases.append((["--steer", steered, "--layers", "0"], 2, "excludes --layers"))
    else:  # --layers chooses where the --alphas act, and 0 is no intervention
        cases.append((["--steer", steered, "--layers", "0"], 2, "--layers / --heads choose where the intervention"))
    for extra, code, expected in cases:
        assert main([*base, *extra]) == code, extra
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_steer_report_draws_and_lists(steered, tmp_path, capsys):
    from avar_ops.cli import main

    out = tmp_path / "report"
    assert main(["steer-report", steered, "--out", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    for name in ("steering_bias.png", "steering_logit_scale.png"):
        assert os.path.getsize(out / name) > 5000, name
    with open(out / "steer_report.json", encoding="utf-8") as f:
        report = json.load(f)
    s = load_steering(steered)
    moved = torch.maximum(s.bias.abs(), (s.logit_scale - 1).abs()).amax(-1)  # [L, H]
    best = torch.topk(moved.flatten(), 3).values
    assert [r["moved"] for r in report["moved"]] == pytest.approx(best.tolist(), rel=1e-6)
    first = report["moved"][0]
    assert moved[first["layer"], first["head"]] == pytest.approx(best[0].item(), rel=1e-6)
    assert f"{first['layer']:5d} {first['head']:4d} {first['moved']:7.4f}" in printed
    assert len([line for line in printed.splitlines() if line[:5].strip().isdigit()]) == 3


@pytest.mark.parametrize(
    "argv, code, expected",
    [
        (["steer-report", "absent.safetensors"], 2, "steering file not found"),
        (["steer-report", "JUNK"], 1, "not a readable safetensors file"),
        (["steer-report", "FILE", "--top", "0"], 2, "--top: expected a positive number"),
        (["steer-report", "FILE", "--out", "JUNK"], 2, "--out: "),
    ],
)
def test_steer_report_errors(steered, tmp_path, capsys, argv, code, expected):
    from avar_ops.cli import main

    junk = tmp_path / "junk.safetensors"
    junk.write_text("{}")
    argv = [{"JUNK": str(junk), "FILE": steered}.get(a, a) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_penalty_is_the_mean_square_over_trained_entries():
    from avar_train.steer.trainer import SteeringTables

    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        bias, scale = torch.randn(3, 4, 4, generator=gen), 1 + torch.randn(3, 4, 4, generator=gen)
        trainable = torch.rand(3, 4, 4, generator=gen) > 0.5
        tables = SteeringTables(bias, scale, trainable)
        want = 0.3 * bias[trainable].square().mean() + 0.7 * (scale[trainable] - 1).square().mean()
        torch.testing.assert_close(tables.penalty(0.3, 0.7), want.float(), rtol=1e-6, atol=0)
        only_bias = SteeringTables(bias, scale, trainable, train_logit_scale=False)
        torch.testing.assert_close(only_bias.penalty(0.3, 0.7), (0.3 * bias[trainable].square().mean()).float())


def test_l2_pull_keeps_the_tables_near_plain_attention(tiny_dir, train_file, tmp_path):
    """With a strong pull the tables end much closer to β = 0, γ = 1 than the same run without it."""
    free = train_steer(_config(tiny_dir, train_file, tmp_path / "free", learning_rate=0.1)).tables
    held = train_steer(
        _config(tiny_dir, train_file, tmp_path / "held", learning_rate=0.1, l2_bias=1e3, l2_logit_scale=1e3)
    ).tables
    for name, identity in (("bias", 0.0), ("logit_scale", 1.0)):
        moved_free = (getattr(free, name).detach() - identity).abs().mean()
        moved_held = (getattr(held, name).detach() - identity).abs().mean()
        assert moved_held < 0.5 * moved_free, (name, float(moved_held), float(moved_free))


# ------------------------------------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_train_only_steering_moves_only_the_tables(tmp_path, seed):
    """GRPO with train_only: steering updates the tables and nothing else, keeps them in their bounds, resumes
    from its checkpoint, and writes a steering file as its result."""
    from grpo_fixtures import hash_checker, write_colour_task

    from avar_ops.analysis import build_tiny_qwen2_5_vl
    from avar_train.grpo.config import load_grpo_config
    from avar_train.grpo.rewards import accuracy_reward
    from avar_train.grpo.trainer import GRPOTrainer, train_grpo

    data = write_colour_task(str(tmp_path / "data"), n=6)
    values = dict(
        model_name_or_path="tiny",
        train_file=data,
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=0.05,
        seed=seed,
        train_only="steering",
    )
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GRPOTrainer(load_grpo_config(None, values), model, processor, accuracy=accuracy_reward(hash_checker))
    trainer.train()
    trainer.save_model()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    trained = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    assert trained == ["avar_steering.bias", "avar_steering.logit_scale"]
    for name, value in unwrapped.named_parameters():
        if name in before:
            assert torch.equal(value, before[name]), name
    tables = trainer.tables
    assert tables.bias.abs().max() > 0 and tables.bias.abs().max() <= 10.0
    saved = load_steering(str(tmp_path / "out" / STEERING_FILE))
    assert torch.equal(saved.bias, tables.bias.detach()) and saved.trained["trainer"] == "avar-train grpo"

    # the same recipe through train_grpo, resumed from its step-1 checkpoint, ends with the same tables
    again = dict(values, output_dir=str(tmp_path / "again"), save_steps=1)
    model2, processor2 = build_tiny_qwen2_5_vl(seed=0)
    train_grpo(
        load_grpo_config(None, again), model=model2, processor=processor2, accuracy=accuracy_reward(hash_checker)
    )
    resumed = dict(
        again, output_dir=str(tmp_path / "again"), resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-1")
    )
    model3, processor3 = build_tiny_qwen2_5_vl(seed=0)
    history = train_grpo(
        load_grpo_config(None, resumed), model=model3, processor=processor3, accuracy=accuracy_reward(hash_checker)
    )
    assert [r["step"] for r in history] == [2]  # it started from the checkpoint's tables, not from identity
    end = load_steering(str(tmp_path / "again" / STEERING_FILE))
    torch.testing.assert_close(end.bias, saved.bias, rtol=0, atol=1e-6)


def test_grpo_train_only_values():
    from avar_train.grpo.config import ConfigError, load_grpo_config

    for values, expected in (
        ({"train_only": "tables"}, "train_only: must be 'model' or 'steering', got 'tables'"),
        ({"train_only": "steering", "weight_decay": 0.1}, "weight_decay: must be 0 with train_only: steering"),
    ):
        with pytest.raises(ConfigError) as err:
            load_grpo_config(None, {"train_file": __file__, "output_dir": "x", **values})
        assert expected in str(err.value), str(err.value)
