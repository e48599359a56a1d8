"""SFT under the launchers users run it with, on the CPU: `accelerate launch` with the shipped ZeRO-2 and ZeRO-3
configs (single process, the real DeepSpeed engine over gloo) and `torchrun` with two data-parallel processes.
Their first steps' losses equal the plain single-process run's."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from sft_fixtures import tiny_pair, write_sft_records

from avar_train.sft.config import SFTConfig
from avar_train.sft.trainer import train_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
KEYS = ("loss", "loss_lm", "loss_enhance_img", "loss_suppress_sys", "vas", "image_mass", "grad_norm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    model, processor = tiny_pair()
    model.save_pretrained(root / "tiny")
    processor.save_pretrained(root / "tiny")
    recipe = dict(
        model_name_or_path=str(root / "tiny"),
        train_file=write_sft_records(str(root / "data"), n=4),
        max_length=256,
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        max_steps=STEPS,
        per_device_train_batch_size=2,
    )
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return root, recipe, str(path)


def _history(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if "loss_lm" in row]


def _plain(setup, name, **overrides):
    root, recipe, _ = setup
    train_sft(SFTConfig(**{**recipe, "output_dir": str(root / name), **overrides}).validate())
    return _history(root / name)


def _launch(setup, launcher, name, *overrides):
    root, _, recipe_path = setup
    out = root / name
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        "-m",
        *launcher,
        "-m",
        "avar_train.cli",
        "sft",
        "--config",
        recipe_path,
        f"output_dir={out}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "run_info.json") as f:
        return _history(out), json.load(f)


def _same_steps(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)


@pytest.fixture(scope="module")
def plain(setup):
    return _plain(setup, "plain")


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_single_process_matches_plain(setup, plain, stage):
    history, info = _launch(
        setup,
        [
            "accelerate.commands.launch",
            "--config_file",
            f"training/configs/accelerate_zero{stage}.yaml",
            "--num_processes",
            "1",
        ],
        f"zero{stage}",
    )
    assert info["distributed_type"] == "DEEPSPEED" and info["zero_stage"] == stage
    _same_steps(history, plain)


def test_torchrun_two_process_data_parallel_matches_accumulation(setup):
    # Two processes with one sample each take the step one process takes with two accumulated samples.
    plain = _plain(setup, "plain_accum", per_device_train_batch_size=1, gradient_accumulation_steps=2)
    history, info = _launch(
        setup,
        ["torch.distributed.run", "--nproc_per_node", "2"],
        "ddp",
        "per_device_train_batch_size=1",
        "use_cpu=true",
        "ddp_backend=gloo",
    )
    assert info == {"distributed_type": "MULTI_CPU", "num_processes": 2, "zero_stage": None, "backend": "gloo"}
    _same_steps(history, plain)
