"""`avar-train grpo` under `accelerate launch` with the shipped DeepSpeed ZeRO-2 and ZeRO-3 configs (one CPU
process, the real DeepSpeedEngine over gloo): the first step's rollouts and rewards equal those of the plain
in-process run, and the run writes its log, checkpoint and final model. Also the command line's one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from grpo_fixtures import initial_checker, write_colour_task

from avar_ops.analysis import build_tiny_qwen2_5_vl
from avar_train.grpo.config import load_grpo_config
from avar_train.grpo.rewards import accuracy_reward
from avar_train.grpo.trainer import GRPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "training", "configs", "grpo_tiny.yaml")
OVERRIDES = ["max_steps=2", "save_steps=0", "accuracy_checker=grpo_fixtures:initial_checker"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_task(str(tmp_path_factory.mktemp("colour")), n=4)


@pytest.fixture(scope="module")
def plain_first_step(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    overrides = dict(train_file=data, output_dir=str(out), max_steps=1)
    cfg = load_grpo_config(RECIPE, overrides)
    model, processor = build_tiny_qwen2_5_vl(seed=cfg.seed)
    return GRPOTrainer(cfg, model, processor, accuracy=accuracy_reward(initial_checker)).train()[0]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_accelerate_launch_deepspeed(stage, data, tmp_path, plain_first_step):
    pytest.importorskip("deepspeed", reason="the DeepSpeed launch needs the train extra (deepspeed)")
    out = tmp_path / stage
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "training", "configs", f"accelerate_{stage}.yaml"),
        "--num_processes",
        "1",
        "-m",
        "avar_train.cli",
        "grpo",
        "--config",
        RECIPE,
        f"train_file={data}",
        f"output_dir={out}",
        *OVERRIDES,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    first = log[0]
    # Same seed, same weights, same sampling: the engine changes nothing before the first update.
    for key in ("reward", "r_acc", "r_visual_raw", "response_image_mass", "completion_length"):
        assert first[key] == pytest.approx(plain_first_step[key], rel=1e-5, abs=1e-7), key
    assert all(v == v for r in log for v in r.values() if isinstance(v, float))
    assert (out / "checkpoint-2" / "grpo_state.json").is_file()
    assert (out / "config.json").is_file()  # the final model in output_dir itself


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--config", "missing.yaml"], 2, "config file not found"),
        (["--config", RECIPE, "train_file=DATA", "output_dir=OUT", "lambda_visula=0.3"], 2, "unknown key"),
        (["--config", RECIPE, "train_file=/nonexistent.jsonl", "output_dir=OUT"], 2, "train_file"),
        (
            ["--config", RECIPE, "train_file=DATA", "output_dir=OUT", "num_generations=3"],
            2,
            "per_device_train_batch_size",
        ),
    ],
)
def test_cli_errors_are_one_line(args, code, needle, data, tmp_path, capsys):
    from avar_train.cli import main

    args = [a.replace("DATA", data).replace("OUT", str(tmp_path / "o")) for a in args]
    assert main(["grpo", *args]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
