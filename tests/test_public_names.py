"""The names users reach for keep working after the package was split into rooms: the op at the top level,
avar_ops.hf and avar_ops.method, the answer checker under avar_ops.analysis (moved to avar_ops.grading, re-
exported), the `avar` and `avar-train` commands with every flag they had, and `python -m avar_train.cli`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every flag of every subcommand, as the parsers had them before the move (avar_ops/analysis/cli.py,
# avar_ops/analysis/evaluation/commands.py and training/cli.py at 78f12cc).
_MODEL = ["--model", "--dtype", "--device"]
_INTERVENTION = ["--mode", "--alpha-img", "--alpha-sys", "--beta-img", "--beta-sys", "--layers", "--heads"]
AVAR_FLAGS = {
    "vas": _MODEL
    + _INTERVENTION
    + ["--data", "--limit", "--out", "--label", "--compare", "--batch-size", "--vas-layers", "--heatmaps"]
    + ["--heatmap-layers", "--heatmap-queries", "--max-new-tokens", "--no-progress", "--overwrite"]
    + ["--data-format"]  # added since: the layout of --data
    + ["--compare-depth"],  # added since: the x axis of cross-family comparisons
    "generate": _MODEL
    + _INTERVENTION
    + ["--image", "--question", "--system", "--max-new-tokens", "--baseline", "--no-progress"],
    "sweep": _MODEL
    + ["--mode", "--layers", "--heads"]
    + ["--data", "--alphas", "--alpha-sys", "--limit", "--out", "--batch-size", "--max-new-tokens", "--no-progress"]
    + ["--data-format", "--overwrite"],
    "demo": ["--family", "--out"],
    "eval": _MODEL
    + _INTERVENTION
    + ["--bench", "--out", "--label", "--limit", "--batch-size", "--max-new-tokens", "--system", "--min-pixels"]
    + ["--max-pixels", "--seed", "--judge-url", "--judge-model", "--judge-key-env", "--checker-timeout"]
    + ["--no-progress", "--resume", "--overwrite"]
    + ["--sample", "--sample-seed", "--mathverse-prompt", "--hallusion-instruction", "--judge-retries"]  # added since
    + ["--scoring"],
    "correlate": ["--out", "--confidence"],
}
TRAIN_FLAGS = {"sft": ["--config"], "vard": ["--config"], "grpo": ["--config"], "check": ["--command", "--config"]}


def _flags(parser: argparse.ArgumentParser) -> dict:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: sorted(o for act in p._actions for o in act.option_strings if o not in ("-h", "--help"))
        for name, p in sub.choices.items()
    }


def test_top_level_hf_and_method_names():
    import avar_ops
    import avar_ops.hf
    import avar_ops.method

    for name in ("attention", "attention_key_mass", "attention_reference", "Group", "NUM_GROUPS", "GROUP_NAMES"):
        assert hasattr(avar_ops, name), name
    for module in (avar_ops.hf, avar_ops.method):
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert module.__all__ and not missing, (module.__name__, missing)
    assert callable(avar_ops.hf.apply_to_qwen2_5_vl) and callable(avar_ops.method.vas)


def test_answer_checking_is_still_reachable_from_analysis():
    import avar_ops.analysis as analysis
    import avar_ops.data as data
    import avar_ops.grading as grading

    for name in ("check_answer", "check_answers", "extract_answer", "AnswerChecker", "AnswerSpec", "CheckResult"):
        assert getattr(analysis, name) is getattr(grading, name), name
    for name in ("ChatClient", "ChatClientError", "LatexChecker"):
        assert getattr(analysis, name) is getattr(grading, name), name
    for name in ("load_samples", "normalize_sample", "load_images", "chat_messages", "build_inputs"):
        assert getattr(analysis, name) is getattr(data, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        analysis.__getattr__("nothing_here")
    from avar_ops.analysis import AnswerChecker, AnswerSpec, check_answer

    assert check_answer("<answer>12</answer>", "12").status == "correct"
    assert check_answer("<answer>13</answer>", "12").status == "incorrect"
    assert AnswerSpec("12").gold == "12"
    assert AnswerChecker is grading.AnswerChecker


def test_every_avar_flag_is_still_there():
    from avar_ops.cli import build_parser

    assert _flags(build_parser()) == {k: sorted(v) for k, v in AVAR_FLAGS.items()}


def test_every_avar_train_flag_is_still_there():
    from avar_train.cli import build_parser

    assert _flags(build_parser()) == TRAIN_FLAGS


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "avar_train.cli", "--help"],
        ["-m", "avar_ops.cli", "--help"],
        ["-c", "from avar_ops.cli import main; raise SystemExit(main(['--help']))"],
    ],
    ids=["python -m avar_train.cli", "python -m avar_ops.cli", "avar entry point"],
)
def test_commands_start(argv, tmp_path):
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: avar"), res.stdout


def test_installed_entry_points_name_the_new_modules():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name in ("avar", "avar-train")}
    assert scripts == {"avar": "avar_ops.cli:main", "avar-train": "avar_train.cli:main"}
