"""The docs match the code.

- Every command shown in README.md, docs/*.md and benchmarks/README.md (lines of bash/shell code blocks, and
  indented lines starting with a command name) is run here (RUN_HERE), run by another test (COVERED, named), or
  listed with the reason it cannot run here (NOT_RUN). An unlisted command fails with its file and line; so does
  a listed command the docs no longer show. Whatever the table, the flags and recipe keys a command uses must
  exist in the parser or recipe it goes to, and the files it names must exist.
- Every number the docs quote as a measurement (speedups, ratios, ms / µs, MB / GB, %) is found in a committed
  file under benchmarks/results/ (MEASURED: the file, the column, the rows), or is a number the code or the
  repository fixes, checked here (FIXED).
- The command reference under docs/reference/ equals a fresh run of scripts/gen_reference.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PROGRAMS = ("avar", "avar-train", "python", "bash", "pip", "accelerate", "torchrun")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def _doc_files():
    docs = sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    return ["README.md", *docs, os.path.join("benchmarks", "README.md")]


def _words(command: str):
    words = shlex.split(command)
    while words and _ENV.match(words[0]):
        words = words[1:]
    return words


def _program(line: str) -> str:
    """The first word of a line that is not a VAR=value assignment (plain split: the line may end in '\\')."""
    words = [w for w in line.split() if not _ENV.match(w)]
    return words[0] if words else ""


def documented_commands():
    """[(file, line, command)]: continuation lines joined, trailing comments and repeated spaces dropped."""
    found = []
    for name in _doc_files():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            lines = f.read().splitlines()
        fence, i = None, 0
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = None if fence is not None else (stripped[3:].strip() or "text")
                i += 1
                continue
            shell = fence in ("bash", "sh", "shell", "console") and stripped and not stripped.startswith("#")
            indented = (
                fence is None
                and line.startswith("    ")
                and stripped
                and (
                    _program(stripped) in PROGRAMS
                    or re.match(r"(benchmarks|scripts)/\w+\.(sh|py)$", _program(stripped))
                )
            )
            if shell or indented:
                start, text = i, stripped
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                text = re.sub(r"\s+#\s.*$", "", text)
                found.append((name, start + 1, re.sub(r"\s+", " ", text).strip()))
            i += 1
    return found


# ------------------------------------------------------------------------------------------- the command tables

_RESUME_1 = (
    "avar-train sft --config training/configs/sft_tiny.yaml train_file=examples/shapes/train.jsonl "
    "output_dir=runs/sft-resume save_steps=2 max_steps=6"
)
_RESUME_2 = (
    "avar-train sft --config training/configs/sft_tiny.yaml train_file=examples/shapes/train.jsonl "
    "output_dir=runs/sft-resume save_steps=2 max_steps=6 resume=true"
)

_STEER = (
    "avar-train steer --config training/configs/steer_tiny.yaml train_file=examples/shapes/train.jsonl "
    "eval_file=examples/shapes/eval.jsonl output_dir=runs/steer-tiny",
    "avar steer-report runs/steer-tiny/steering.safetensors --out runs/steer-report",
    "avar vas --data examples/shapes/eval.jsonl --limit 4 --steer runs/steer-tiny/steering.safetensors "
    "--out runs/steer-vas",
    "avar sweep --data examples/shapes/eval.jsonl --limit 4 --alphas 0 0.15 --steer "
    "runs/steer-tiny/steering.safetensors --max-new-tokens 8 --out runs/steer-sweep",
)

# Commands run in this file, as written (run folders moved to a temporary folder): command -> test.
RUN_HERE = {
    _RESUME_1: "test_readme_resume_example_runs",
    _RESUME_2: "test_readme_resume_example_runs",
    **{command: "test_readme_steering_example_runs" for command in _STEER},
}

# Commands whose full run (on the tiny model, temporary folders) is another test: command -> that test.
COVERED = {
    "avar demo [--out DIR]": "tests/test_cli.py::test_demo",
    "avar vas --model DIR --data FILE.jsonl --limit 200 --out OUT [--compare DIR2 ...] [--heatmaps N]": (
        "tests/test_cli.py::test_vas_on_checkpoint_folder_and_compare"
    ),
    'avar generate --model DIR --image IMG.png --question "..." --alpha-img 0.15 --alpha-sys 0.2 --mode weights': (
        "tests/test_cli.py::test_generate_prints_both_answers"
    ),
    "avar sweep --model DIR --data FILE.jsonl --alphas 0 0.15 0.15:0.2 --out OUT": (
        "tests/test_cli.py::test_sweep_writes_table"
    ),
    "avar correlate runs/qwen7b runs/qwen7b_iv runs/avar_sft runs/avar_rl --out runs/correlation": (
        "tests/test_eval_cli.py::test_correlate_command"
    ),
    "avar-train sft --config training/configs/sft_tiny.yaml max_steps=60 train_file=examples/shapes/train.jsonl "
    "eval_file=examples/shapes/eval.jsonl eval_steps=20 output_dir=runs/shapes-sft": (
        "tests/test_examples.py::test_readme_first_run_trains"
    ),
    "avar-train grpo --config training/configs/grpo_tiny.yaml model_name_or_path=runs/shapes-sft "
    "train_file=examples/shapes/train.jsonl eval_file=examples/shapes/eval.jsonl max_completion_length=48 "
    "learning_rate=1.0e-4 visual_reward=capped_ratio visual_reward_cap=2 output_dir=runs/shapes-grpo": (
        "tests/test_examples.py::test_readme_first_run_trains"
    ),
    "avar-train vard --config vard.yaml": "tests/test_train_vard.py::test_vard_over_http_end_to_end",
    "avar-train sft --config training/configs/sft_tiny.yaml train_file=vard_out/vard.jsonl output_dir=runs/sft-tiny": (
        "tests/test_examples.py::test_readme_first_run_trains"
    ),
    "torchrun --nproc_per_node 2 -m avar_train.cli sft --config RECIPE use_cpu=true ddp_backend=gloo": (
        "tests/test_train_sft_launch.py::test_torchrun_two_process_data_parallel_matches_accumulation"
    ),
    "avar-train grpo --config training/configs/grpo_tiny.yaml train_file=data/rl.jsonl output_dir=runs/grpo-tiny": (
        "tests/test_train_grpo_launch.py::test_accelerate_launch_deepspeed"
    ),
}

# Commands that cannot run here: command -> why.
NOT_RUN = {
    "bash scripts/demo.sh": "creates .venv and installs packages (network); the demo itself: tests/test_cli.py",
    "bash scripts/test.sh": "the whole suite (a long run); it is the test command",
    "pip install --no-build-isolation -e .": "installs into the environment; the extension build is what "
    "every test loads",
    'pip install --no-build-isolation -e ".[analysis,eval,train]"': "network (the extras' packages)",
    'pip install --no-build-isolation -e ".[analysis,eval]"': "network (the extras' packages)",
    "avar eval --model /ckpt/Qwen2.5-VL-7B-Instruct --dtype bfloat16 --device cuda --bench "
    "mathvista=/data/MathVista mathvision=/data/MathVision mathverse=/data/MathVerse mmmu=/data/MMMU "
    "mmmu_pro=/data/MMMU_Pro mmstar=/data/MMStar hallusionbench=/data/HallusionBench --batch-size 8 "
    "--out runs/qwen7b": "7B weights, a GPU and the benchmarks' data; the tiny-model run "
    "is tests/test_eval_cli.py::test_eval_writes_report_and_records",
    "avar eval ... --bench mathvista=/data/MathVista --sample 200 --out runs/qwen7b_vas": (
        "7B weights, a GPU and MathVista's data ('...' stands for the command above); --sample on the tiny "
        "model: tests/test_eval_cli.py::test_harness_limits_and_seeded_sample"
    ),
    'avar eval ... --alpha-img 0.15 --alpha-sys 0.2 --mode weights --label "qwen7b+iv" --out runs/qwen7b_iv': (
        "7B weights, a GPU and the benchmarks' data (and '...' stands for the command above)"
    ),
    "accelerate launch --config_file training/configs/accelerate_zero3.yaml --num_processes 8 -m avar_train.cli "
    "sft --config training/configs/sft_qwen2_5_vl_7b.yaml model_name_or_path=/models/Qwen2.5-VL-7B-Instruct "
    "train_file=vard_out/vard.jsonl output_dir=/runs/avar-sft": "8 GPUs and 7B weights; the launch path on the "
    "tiny model: tests/test_train_sft_launch.py",
    "accelerate launch --config_file training/configs/accelerate_zero3.yaml --num_processes 8 -m avar_train.cli "
    "grpo --config training/configs/grpo_qwen2_5_vl_7b.yaml model_name_or_path=/models/avar-sft "
    "train_file=/data/rl.jsonl output_dir=/runs/avar-grpo": "8 GPUs and 7B weights; the launch path on the tiny "
    "model: tests/test_train_grpo_launch.py",
    "PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/compare_builds.py --baseline /tmp/avar-old": "a second "
    "built source tree and minutes of timing; the script's arguments: test_compare_builds_runs_as_written",
    "avar-train steer --config training/configs/steer_qwen2_5_vl_7b.yaml "
    "model_name_or_path=/models/Qwen2.5-VL-7B-Instruct train_file=vard_out/vard.jsonl output_dir=/runs/steer-7b": (
        "7B weights and a GPU; the same command on the tiny model: test_readme_steering_example_runs"
    ),
    'avar eval ... --steer /runs/steer-7b/steering.safetensors --label "qwen7b+steer" --out runs/qwen7b_steer': (
        "7B weights, a GPU and the benchmarks' data ('...' stands for the eval command above); --steer on the tiny "
        "model: tests/test_steering_train.py::test_eval_takes_the_file"
    ),
    "benchmarks/gpu_check.sh [--dry-run] [LOGDIR]": "a GPU (its stages build and run CUDA kernels); the --dry-run "
    "form runs in tests/test_gpu_check.py::test_dry_run_skips_every_stage_and_writes_the_report",
}


def test_every_documented_command_is_run_or_listed():
    listed = {**RUN_HERE, **COVERED, **NOT_RUN}
    shown = documented_commands()
    missing = [f"{name}:{line}: {cmd}" for name, line, cmd in shown if cmd not in listed]
    assert not missing, "commands in the docs that no test runs and no table lists (tests/test_docs.py):\n" + (
        "\n".join(missing)
    )
    stale = sorted(set(listed) - {cmd for _, _, cmd in shown})
    assert not stale, "tests/test_docs.py lists commands the docs no longer show:\n" + "\n".join(stale)
    assert not (set(RUN_HERE) & set(COVERED)) and not ((set(RUN_HERE) | set(COVERED)) & set(NOT_RUN))


def test_covering_tests_exist():
    this = open(__file__, encoding="utf-8").read()
    for where in RUN_HERE.values():
        assert f"def {where.split()[0]}(" in this, where
    for where in COVERED.values():
        path, _, name = where.partition("::")
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert re.search(rf"^def {re.escape(name)}\(", f.read(), re.M), f"{where}: no such test"


def _option_strings(parser):
    return {s for a in parser._actions for s in a.option_strings}


def _subparser(parser, name):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict) and name in action.choices:
            return action.choices[name]
    raise AssertionError(f"{parser.prog} has no subcommand {name!r}")


def _flags(words):
    return [w.strip("[]").split("=")[0] for w in words if w.strip("[").startswith("--")]


def _check_avar(words, where):
    from avar_ops.cli import build_parser

    sub = _subparser(build_parser(), words[0])
    unknown = [f for f in _flags(words[1:]) if f not in _option_strings(sub)]
    assert not unknown, f"{where}: avar {words[0]} has no {unknown}"


def _config_class(command):
    from avar_train.data.vard_config import VARDConfig
    from avar_train.grpo.config import GRPOConfig
    from avar_train.sft.config import SFTConfig
    from avar_train.steer.config import SteerConfig

    return {"sft": SFTConfig, "steer": SteerConfig, "grpo": GRPOConfig, "vard": VARDConfig}.get(command)


def _check_avar_train(words, where):
    from avar_train.cli import build_parser

    sub = _subparser(build_parser(), words[0])
    unknown = [f for f in _flags(words[1:]) if f not in _option_strings(sub)]
    assert not unknown, f"{where}: avar-train {words[0]} has no {unknown}"
    recipe = _config_class(words[0])
    if "--config" not in words or recipe is None:  # a subcommand without a recipe: its flags are all there is
        return
    config = words[words.index("--config") + 1]
    if config.startswith("training/"):
        assert os.path.isfile(os.path.join(ROOT, config)), f"{where}: no recipe {config}"
    fields = {f.name for f in dataclasses.fields(recipe)}
    keys = [w.partition("=")[0] for w in words[1:] if "=" in w and not w.startswith("-")]
    unknown = [k for k in keys if k not in fields]
    assert not unknown, f"{where}: the {words[0]} recipe has no keys {unknown}"


def _check_command(command, where):
    words = _words(command)
    if words[0] == "avar":
        _check_avar(words[1:], where)
    elif words[0] == "avar-train":
        _check_avar_train(words[1:], where)
    elif "-m" in words and words[words.index("-m") + 1] == "avar_train.cli":
        rest = words[words.index("-m") + 2 :]
        _check_avar_train(rest, where)
        if words[0] == "accelerate":
            assert os.path.isfile(os.path.join(ROOT, words[words.index("--config_file") + 1])), where
    elif words[0] in ("python", "bash") or words[0].startswith(("benchmarks/", "scripts/")):
        script = words[1] if words[0] in ("python", "bash") else words[0]
        assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: no file {script}"
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            source = f.read()
        for flag in _flags(words[2:] if words[0] in ("python", "bash") else words[1:]):
            assert f'"{flag}"' in source, f"{where}: {script} takes no {flag}"
    elif words[0] == "pip":
        with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
            pyproject = f.read()
        for extras in re.findall(r"\[([a-z,]+)\]", command):
            for extra in extras.split(","):
                assert re.search(rf"^{extra} = \[", pyproject, re.M), f"{where}: no extra {extra!r}"
    else:
        raise AssertionError(f"{where}: no check for {command!r}")


@pytest.mark.parametrize("name, line, command", documented_commands(), ids=lambda v: str(v)[:40])
def test_documented_flags_keys_and_files_exist(name, line, command):
    _check_command(command, f"{name}:{line}")


def test_readme_resume_example_runs(tmp_path, monkeypatch, capsys):
    """The README's two resume commands, as written, with runs/ moved under tmp_path. The first run is cut back to
    what a crash after step 4 leaves (its newest whole checkpoint is checkpoint-4); the second, the same command
    with resume=true, continues from there to step 6 with no step logged twice. Asking for the latest checkpoint
    of a folder that holds none is refused in one line."""
    import shutil

    from avar_train.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def moved(command):
        return [w.replace("=runs/", f"={tmp_path}/") for w in shlex.split(command)[1:]]

    assert main(moved(_RESUME_1)) == 0
    out = tmp_path / "sft-resume"
    saved = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert saved[-2:] == ["checkpoint-4", "checkpoint-6"], saved
    shutil.rmtree(out / "checkpoint-6")
    assert main(moved(_RESUME_2)) == 0
    assert (out / "checkpoint-6").is_dir()
    with open(out / "log.jsonl") as f:
        steps = [row["step"] for row in map(json.loads, f) if "loss_lm" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run logs steps 5 and 6 after the first run's 1 to 4

    empty = tmp_path / "no-checkpoint"
    argv = moved(_RESUME_1.replace("output_dir=runs/sft-resume", f"output_dir={empty}")) + [
        "resume_from_checkpoint=latest"
    ]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds no whole checkpoint" in err and len(err.strip().splitlines()) == 1, err


def test_readme_steering_example_runs(tmp_path, monkeypatch, capsys):
    """The README's steering commands on the tiny model, as written, with runs/ moved under tmp_path: the tables
    are learned and saved, the report draws them and names the heads that moved most, and vas and sweep run with
    the file (the sweep's last row is the file's)."""
    from avar_ops.cli import main as avar_main
    from avar_train.cli import main as train_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def moved(command):
        words = shlex.split(command)[1:]
        return [
            w.replace("=runs/", f"={tmp_path}/")
            if "=runs/" in w
            else w.replace("runs/", f"{tmp_path}/", 1)
            if w.startswith("runs/")
            else w
            for w in words
        ]

    train, report, vas, sweep = _STEER
    assert train_main(moved(train)) == 0
    assert (tmp_path / "steer-tiny" / "steering.safetensors").is_file()
    assert avar_main(moved(report)) == 0
    assert "moved most from plain attention" in capsys.readouterr().out
    assert (tmp_path / "steer-report" / "steering_bias.png").is_file()
    assert avar_main(moved(vas)) == 0
    with open(tmp_path / "steer-vas" / "vas.json", encoding="utf-8") as f:
        assert json.load(f)["intervention"]["format"] == "avar-steering"
    assert avar_main(moved(sweep) + ["--no-progress"]) == 0
    with open(tmp_path / "steer-sweep" / "sweep.json", encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    assert [r["mode"] for r in rows] == ["weights", "weights", "steer"]


def test_compare_builds_runs_as_written():
    """`benchmarks/compare_builds.py` is executable with a Python shebang, and its documented flag parses."""
    script = os.path.join(ROOT, "benchmarks", "compare_builds.py")
    assert os.access(script, os.X_OK)
    with open(script, encoding="utf-8") as f:
        assert f.readline().startswith("#!/usr/bin/env python")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run([script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--baseline" in done.stdout


# ------------------------------------------------------------------------------------------ the reference pages


def test_reference_pages_match_a_fresh_generation():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gen_reference.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).strip() or "run scripts/gen_reference.py"


def test_readme_links_the_reference():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "docs/reference/README.md" in readme
    assert os.path.isfile(os.path.join(ROOT, "docs", "reference", "README.md"))


# ---------------------------------------------------------------------------------------------- quoted numbers

_SCI = r"\d+(?:\.\d+)?·10[⁰¹²³⁴⁵⁶⁷⁸⁹]+"
_QUOTED = re.compile(
    r"(?<![\w.])[~≈]?\d+(?:\.\d+)?(?:\s?[–-]\s?\d+(?:\.\d+)?)?\s?(?:×(?!\s?\d)|%|ms|µs|GB|MB|kB|s\b)"
    rf"|{_SCI}(?:–{_SCI})?"
)
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
NUMBER_DOCS = ("README.md", os.path.join("docs", "design.md"), os.path.join("benchmarks", "README.md"))


def _kind(kind):
    return lambda r: r["visual_reward"] == kind


def _memory_row(length):
    return lambda r: r["L"] == length and "dtype" not in r


def _B8_16K(dtype=None):
    """The decode cells at B = 8 with a 16k cache (of one dtype)."""
    return lambda r: r["B"] == "8" and r["cache"] == "16384" and (dtype is None or r["dtype"] == dtype)


# (doc, quoted text, result file, column(s), row filter, scale, kind). kind: "exact" (a range's ends, or every
# value, equal the quote at its precision), "about" (the quote lies within the rounded values), "bound" (every
# value's distance from 1, in %, is at most the quote).
MEASURED = [
    # design.md's decode-step paragraph: two threads, then one
    ("docs/design.md", "2.2–12.6×", "cpu_decode.md", "sdpa / avar", {"dtype": "float32"}, 1, "exact"),
    ("docs/design.md", "23–47×", "cpu_decode.md", "sdpa / avar", {"dtype": "bfloat16"}, 1, "exact"),
    ("docs/design.md", "3.4–15.2×", "cpu_decode_1thread.md", "sdpa / avar", {"dtype": "float32"}, 1, "exact"),
    ("docs/design.md", "29–42×", "cpu_decode_1thread.md", "sdpa / avar", {"dtype": "bfloat16"}, 1, "exact"),
    ("docs/design.md", "4.0–15.1×", "cpu_decode.md", "avar_tiled / avar", None, 1, "exact"),
    ("docs/design.md", "4.3–16.5×", "cpu_decode_1thread.md", "avar_tiled / avar", None, 1, "exact"),
    ("docs/design.md", "22.4 GB", "cpu_decode.md", "avar K+V GB/s", _B8_16K("float32"), 1, "exact"),
    ("docs/design.md", "23.7 GB", "cpu_decode.md", "avar K+V GB/s", _B8_16K("bfloat16"), 1, "exact"),
    ("docs/design.md", "60–63%", "cpu_decode.md", "of bandwidth", _B8_16K(), 1, "exact"),
    ("docs/design.md", "51–67%", "cpu_decode.md", "of K+V sum", _B8_16K(), 1, "exact"),
    ("docs/design.md", "51–64%", "cpu_decode_1thread.md", "of bandwidth", _B8_16K(), 1, "exact"),
    ("docs/design.md", "52–62%", "cpu_decode_1thread.md", "of K+V sum", _B8_16K(), 1, "exact"),
    ("README.md", "0.4–5 %", "cpu_checks.md", "checks / op", None, 100, "exact"),
    ("README.md", "22–68 µs", "cpu_checks.md", "value checks (µs)", None, 1, "exact"),
    # the README's first run, benchmarks/rvisual_example.py: per-token ratios and the steps' mean r_visual
    ("README.md", "25–66", "cpu_rvisual_example.md", "token ratio p50", None, 1, ""),
    ("README.md", "3.6·10⁴–6.6·10⁵", "cpu_rvisual_example.md", "token ratio max", None, 1, ""),
    ("README.md", "1.8·10³–3.4·10⁴", "cpu_rvisual_example.md", "r_visual before gating", _kind("ratio"), 1, ""),
    ("README.md", "1.41–1.46", "cpu_rvisual_example.md", "r_visual before gating", _kind("capped_ratio"), 1, ""),
    # learned steering against an AGTO SFT step and a forward on the 7B-shaped slice (benchmarks/steer_compare.py)
    ("README.md", "0.494×", "cpu_steer_compare.md", "steering / AGTO SFT", {"measure": "CPU s"}, 1, "exact"),
    ("README.md", "0.407×", "cpu_steer_compare.md", "steering / AGTO SFT", {"measure": "process peak MB"}, 1, "exact"),
    ("README.md", "1.113×", "cpu_steer_compare.md", "steering / forward", {"measure": "process peak MB"}, 1, "exact"),
    ("README.md", "1.00×", "cpu_grpo_step.md", "total vs SDPA", {"L": "960", "method": "avar (fused masses)"}, 1, ""),
    ("README.md", "0.95×", "cpu_grpo_step.md", "peak vs SDPA", {"L": "960", "method": "avar (fused masses)"}, 1, ""),
    ("README.md", "1.08×", "cpu_grpo_step.md", "total vs SDPA", {"L": "960", "method": "eager maps"}, 1, ""),
    ("README.md", "1.24×", "cpu_grpo_step.md", "peak vs SDPA", {"L": "960", "method": "eager maps"}, 1, ""),
    ("README.md", "1.17×", "cpu_grpo_step.md", "total vs SDPA", {"L": "455", "method": "avar (fused masses)"}, 1, ""),
    ("README.md", "1.13×", "cpu_grpo_step.md", "peak vs SDPA", {"L": "455", "method": "avar (fused masses)"}, 1, ""),
    (
        "README.md",
        "1.22×",
        "cpu_grpo_step.md",
        ("total vs SDPA", "peak vs SDPA"),
        {"L": "455", "method": "eager maps"},
        1,
        "",
    ),
    ("docs/design.md", "1.2–1.8×", "cpu_attention_5b9096d.md", "avar / SDPA causal", {"dtype": "float32"}, 1, ""),
    ("docs/design.md", "~2.2×", "cpu_attention_5b9096d.md", "avar / SDPA+mask", {"dtype": "float32"}, 1, "about"),
    ("docs/design.md", "2.8–7×", "cpu_attention_5b9096d.md", "avar / eager", {"dtype": "float32"}, 1, ""),
    ("docs/design.md", "159 MB", "cpu_attention_5b9096d.md", "avar", {"L": "4096"}, 1, ""),
    ("docs/design.md", "2 GB", "cpu_attention_5b9096d.md", "SDPA + mask", {"L": "4096"}, 1e-3, ""),
    # the memory table (no dtype column; the speed table has an "eager with maps" column too)
    ("docs/design.md", "5.6 GB", "cpu_attention_5b9096d.md", "eager with maps", _memory_row("4096"), 1e-3, ""),
    (
        "docs/design.md",
        "0.92×",
        "cpu_backward_5b9096d.md",
        "avar / SDPA is_causal",
        {"dtype": "bfloat16", "L": "4096", "phase": "bwd"},
        1,
        "",
    ),
    ("docs/design.md", "1.1–1.5×", "cpu_attention.md", "avar / SDPA is_causal, no bias", {"dtype": "float32"}, 1, ""),
    ("docs/design.md", "1.5–1.9×", "cpu_attention.md", "avar / SDPA + additive mask", {"dtype": "float32"}, 1, ""),
    ("docs/design.md", "2.8–3.3×", "cpu_attention.md", "avar / FlexAttention score_mod", {"dtype": "float32"}, 1, ""),
    ("docs/design.md", "3–5×", "cpu_attention.md", "avar / eager with maps", {"dtype": "float32"}, 1, ""),
    (
        "docs/design.md",
        "1.1–1.3×",
        "cpu_backward.md",
        "avar / SDPA is_causal",
        {"dtype": "float32", "phase": "bwd"},
        1,
        "",
    ),
    (
        "docs/design.md",
        "1.2–1.5×",
        "cpu_backward.md",
        "avar / SDPA is_causal",
        {"dtype": "float32", "phase": "fwd_bwd"},
        1,
        "",
    ),
    # "about ±10% for prompts": the per-round median ratio of every prompt case (Lq = Lk > 1) of the forward.
    ("docs/design.md", "10%", "cpu_builds.md", "candidate / baseline, per round", lambda r: r["Lq"] != "1", 1, "bound"),
    ("docs/design.md", "0.4–5 %", "cpu_checks.md", "checks / op", None, 100, "exact"),
]


def _png_kb():
    folder = os.path.join(ROOT, "examples", "shapes", "images")
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".png")) / 1e3


def _png_side():
    from PIL import Image

    folder = os.path.join(ROOT, "examples", "shapes", "images")
    sizes = {Image.open(os.path.join(folder, n)).size for n in os.listdir(folder) if n.endswith(".png")}
    assert len(sizes) == 1
    return sizes.pop()[0]


def _flops_ratio(phase):
    import harness

    kw = dict(batch=1, heads=2, len_q=8, len_k=8, dim=4, causal=True)
    return harness.attention_flops(**kw, phase=phase) / harness.attention_flops(**kw, phase="fwd")


def _gpu_budget():
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8") as f:
        return int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", f.read()).group(1))


def _eager_maps_gb():
    # Qwen2.5-VL-7B: 28 layers × 28 heads of an 8192 × 8192 bf16 map, per sequence.
    return 28 * 28 * 8192**2 * 2 / 1e9


def _lowp_factors():
    from avar_ops.core import testing

    return testing.LOWP_FWD_FACTOR, testing.LOWP_GRAD_FACTOR


# Numbers the code or the repository fixes (not measurements): (doc, quoted text) -> (value it must round to, why).
FIXED = {
    ("README.md", "105 GB"): (lambda: _eager_maps_gb(), "arithmetic: 28 layers × 28 heads × 8192² × 2 bytes"),
    ("docs/design.md", "105 GB"): (lambda: _eager_maps_gb(), "arithmetic: 28 layers × 28 heads × 8192² × 2 bytes"),
    ("README.md", "2×"): (lambda: _lowp_factors()[0], "the forward's bf16 tolerance factor in core/testing.py"),
    ("README.md", "3×"): (lambda: _lowp_factors()[1], "the gradients' bf16 tolerance factor in core/testing.py"),
    ("README.md", "84×"): (_png_side, "the example images' side in pixels"),
    ("README.md", "15 kB"): (_png_kb, "the example images' total size"),
    ("benchmarks/README.md", "2.5×"): (lambda: _flops_ratio("bwd"), "harness.attention_flops, backward"),
    ("benchmarks/README.md", "3.5×"): (lambda: _flops_ratio("fwd_bwd"), "harness.attention_flops, fwd + bwd"),
    ("benchmarks/README.md", "540 s"): (_gpu_budget, "gpu_check.sh's default budget"),
}


def _tables(path):
    """Each Markdown table of a file as a list of {header: cell} rows."""
    tables, block = [], []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines() + [""]
    for line in lines:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) > 2:
            head = block[0]
            tables.append([dict(zip(head, row)) for row in block[2:]])
        block = []
    return tables


def _number(cell: str) -> float:
    return float(re.match(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", cell.strip()).group(0))


def _values(result, columns, where):
    columns = (columns,) if isinstance(columns, str) else columns
    path = os.path.join(RESULTS, result)
    assert os.path.isfile(path), f"no committed result {path}"
    out = []
    for table in _tables(path):
        if not table or not all(c in table[0] for c in columns):
            continue
        keys = where if isinstance(where, dict) else {}
        if not all(k in table[0] for k in keys):
            continue
        for row in table:
            chosen = where(row) if callable(where) else all(row[k] == v for k, v in keys.items())
            if chosen:
                out += [_number(row[c]) for c in columns]
    assert out, f"{result}: no rows with columns {columns} and {where}"
    return out


def _parse_quote(text):
    """'~1.2–1.8×' -> ([1.2, 1.8], [1, 1]): values and their decimals; '3.6·10⁴' is 3.6e4 with -3 decimals
    (the mantissa's precision)."""
    values, decimals = [], []
    for mantissa, power in re.findall(r"(\d+(?:\.\d+)?)(?:·10([⁰¹²³⁴⁵⁶⁷⁸⁹]+))?", text):
        exponent = int(power.translate(_SUPERSCRIPT)) if power else 0
        values.append(float(mantissa) * 10**exponent)
        decimals.append(len(mantissa.partition(".")[2]) - exponent)
    return values, decimals


def _quotes():
    for name in NUMBER_DOCS:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            for line_no, line in enumerate(f.read().splitlines(), 1):
                for m in _QUOTED.finditer(line):
                    yield name, line_no, m.group(0)


def test_every_quoted_number_is_found_or_fixed():
    known = {(doc, text) for doc, text, *_ in MEASURED} | set(FIXED)
    unknown = [f"{doc}:{line}: {text}" for doc, line, text in _quotes() if (doc, text) not in known]
    assert not unknown, (
        "numbers the docs quote that tests/test_docs.py cannot find in benchmarks/results/ (add the result file and "
        "a MEASURED row, or a FIXED row for a number the code fixes):\n" + "\n".join(unknown)
    )
    texts = {}
    for doc in NUMBER_DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            texts[doc] = f.read()
    stale = sorted((doc, text) for doc, text in known if text not in texts[doc])
    assert not stale, f"tests/test_docs.py checks numbers the docs no longer quote: {stale}"


@pytest.mark.parametrize("doc, text, result, columns, where, scale, kind", MEASURED, ids=lambda v: str(v)[:30])
def test_measured_number_matches_its_result_file(doc, text, result, columns, where, scale, kind):
    values = [v * scale for v in _values(result, columns, where)]
    quoted, decimals = _parse_quote(text)
    if kind == "bound":
        worst = max(abs(v - 1) * 100 for v in values)
        assert worst <= quoted[0], f"{doc} quotes ±{text}, {result} has {worst:.1f}%"
    elif kind == "about":
        lo, hi = round(min(values), decimals[0]), round(max(values), decimals[0])
        assert lo <= quoted[0] <= hi, f"{doc} quotes {text}, {result} has {min(values)}..{max(values)}"
    elif len(quoted) == 2:
        got = [round(min(values), decimals[0]), round(max(values), decimals[1])]
        assert got == quoted, f"{doc} quotes {text}, {result} has {min(values)}..{max(values)}"
    else:
        assert all(math.isclose(round(v, decimals[0]), quoted[0]) for v in values), f"{doc}: {text} vs {values}"


@pytest.mark.parametrize("key", sorted(FIXED), ids=lambda k: f"{k[0]}:{k[1]}")
def test_fixed_number_matches_the_code(key):
    compute, why = FIXED[key]
    quoted, decimals = _parse_quote(key[1])
    got = compute()
    assert math.isclose(round(got, decimals[0]), quoted[0]), f"{key[0]} quotes {key[1]} ({why}), the code gives {got}"


def test_relative_links_resolve():
    """Every relative Markdown link of the docs (the reference pages included) names a file that exists."""
    names = list(_doc_files()) + [
        os.path.join("docs", "reference", n) for n in os.listdir(os.path.join(ROOT, "docs", "reference"))
    ]
    broken = []
    for name in names:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(name), target)):
                broken.append(f"{name}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
