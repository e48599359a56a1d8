"""The `avar` command end to end on tiny data written to tmp_path: vas (with a checkpoint folder and --compare),
generate, sweep, demo, and the one-line errors for bad paths and values."""

import csv
import json
import os

import pytest
from tiny_eager import write_jsonl

from avar_ops.analysis import vas
from avar_ops.cli import main
from avar_ops.core import testing


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_jsonl(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def tiny_vas(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vas_tiny")
    assert main(["vas", "--data", data, "--limit", "2", "--out", str(out), "--no-progress", "--heatmaps", "1"]) == 0
    return out


def test_vas_tiny_writes_report_figures_and_heatmaps(tiny_vas):
    report = vas.VASReport.load(str(tiny_vas))
    assert report.label == "tiny" and report.num_samples == 2 and report.vas > 0
    for name in ("vas.json", "vas_heatmap.png", "lazy_attention.png", "attention_samples0_image1.png"):
        assert os.path.getsize(tiny_vas / name) > 1000, name


def test_vas_on_checkpoint_folder_and_compare(tiny_vas, data, tmp_path):
    """A saved checkpoint of the same tiny model loads offline and measures the same VAS; --compare takes the
    earlier report folder and overlays both."""
    from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl(seed=0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    out = tmp_path / "out"
    assert (
        main(
            [
                "vas",
                "--model",
                str(ckpt),
                "--data",
                data,
                "--limit",
                "2",
                "--out",
                str(out),
                "--no-progress",
                "--compare",
                str(tiny_vas),
            ]
        )
        == 0
    )
    ours, base = vas.VASReport.load(str(out)), vas.VASReport.load(str(tiny_vas))
    assert ours.label == "ckpt"
    # Same weights, but the saved processor reloads with the torchvision image backend instead of the PIL one,
    # whose pixel values differ in float32 rounding; the forward is otherwise the same.
    assert ours.vas == pytest.approx(base.vas, rel=testing.FP32_OUT_REL)
    assert os.path.getsize(out / "compare.png") > 1000


def test_vas_with_intervention_raises_vas(tiny_vas, data, tmp_path):
    out = tmp_path / "iv"
    assert (
        main(
            [
                "vas",
                "--data",
                data,
                "--limit",
                "2",
                "--out",
                str(out),
                "--no-progress",
                "--alpha-img",
                "0.5",
                "--alpha-sys",
                "0.5",
            ]
        )
        == 0
    )
    steered, base = vas.VASReport.load(str(out)), vas.VASReport.load(str(tiny_vas))
    assert steered.intervention["alpha_img"] == 0.5
    # Layer 0 has the same inputs either way; its visual/system ratio is multiplied by 1.5 / 0.5 exactly.
    assert steered.per_layer["vas"][0] == pytest.approx(3.0 * base.per_layer["vas"][0], rel=1e-4)


def test_generate_prints_both_answers(data, capsys):
    image = os.path.join(os.path.dirname(data), "images", "s0_0.png")
    assert (
        main(
            [
                "generate",
                "--image",
                image,
                "--question",
                "What colour is the square?",
                "--alpha-img",
                "0.15",
                "--alpha-sys",
                "0.2",
                "--mode",
                "logits",
                "--baseline",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "[no intervention]" in captured.out and "[logits α_img=0.15 α_sys=0.2]" in captured.out
    assert "tokens of 0" in captured.err  # the decoding-step bar of sample 0 (on unless --no-progress)


def test_sweep_writes_table(data, tmp_path, tiny_vas):
    out = tmp_path / "sweep"
    # A negative pair ("-0.5:0.2") starts like an option; the command still reads it as a setting.
    assert (
        main(
            [
                "sweep",
                "--data",
                data,
                "--limit",
                "2",
                "--alphas",
                "0",
                "0.15:0.2",
                "0.4:0.4",
                "-0.5:0.2",
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == [
        "none",
        "weights α_img=0.15 α_sys=0.2",
        "weights α_img=0.4 α_sys=0.4",
        "weights α_img=-0.5 α_sys=0.2",
    ]
    assert rows[0]["answers_changed"] == "0"
    base = vas.VASReport.load(str(tiny_vas))
    assert float(rows[0]["vas"]) == pytest.approx(base.vas, rel=1e-9)
    full = json.loads((out / "sweep.json").read_text())
    layer0 = [r["report"]["per_layer"]["vas"][0] for r in full["rows"]]
    assert layer0[1] == pytest.approx(layer0[0] * 1.15 / 0.8, rel=1e-4)
    assert layer0[2] == pytest.approx(layer0[0] * 1.4 / 0.6, rel=1e-4)
    assert layer0[3] == pytest.approx(layer0[0] * 0.5 / 0.8, rel=1e-4)
    assert len(full["answers"]["none"]) == 2
    md = (out / "sweep.md").read_text()
    assert "| setting |" in md and "## Answers" in md and "\n| s0 | " in md and "\n| s1 | " in md


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "VAS" in text and "answers changed" in text
    for name in (
        "compare.png",
        "baseline/vas.json",
        "intervention/vas.json",
        "attention_baseline_image1.png",
        "attention_intervention_image1.png",
    ):
        assert os.path.getsize(out / name) > 1000, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vas", "--model", "/nonexistent/ckpt", "--data", "DATA", "--out", "OUT"], "does not exist"),
        (["vas", "--model", "DATA", "--data", "DATA", "--out", "OUT"], "is a file"),
        (["vas", "--model", "EMPTY", "--data", "DATA", "--out", "OUT"], "no config.json"),
        (["vas", "--data", "/nonexistent.jsonl", "--out", "OUT"], "data file not found"),
        (["generate", "--image", "/nonexistent.png", "--question", "q"], "file not found"),
        (["generate", "--image", "IMAGE", "--question", "q", "--alpha-sys", "1.0"], "alpha_sys < 1"),
        (["generate", "--image", "IMAGE", "--question", "q", "--mode", "bias", "--alpha-img", "0.1"], "--beta-img"),
        (["sweep", "--data", "DATA", "--alphas", "0.1:x", "--out", "OUT"], "IMG or IMG:SYS"),
        (
            ["generate", "--image", "IMAGE", "--question", "q", "--alpha-img", "0.1", "--layers", "9"],
            "index 9 is out of range",
        ),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    image = os.path.join(os.path.dirname(data), "images", "s0_0.png")
    subst = {"DATA": data, "OUT": str(tmp_path / "out"), "EMPTY": str(tmp_path / "empty"), "IMAGE": image}
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_numbers_are_usage_errors(data, tmp_path, capsys):
    assert main(["vas", "--data", data, "--out", str(tmp_path), "--limit", "0"]) == 2
    assert capsys.readouterr().err == "avar vas: error: --limit: expected a positive number, got 0\n"
