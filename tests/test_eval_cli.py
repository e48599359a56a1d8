"""`avar eval` on the embedded tiny model with tiny benchmark files: report, VAS from generate's prefill equal
to a prefill-only measurement, resume after an interruption, argument errors before any model loads;
`avar correlate` on fabricated runs."""

import json
import os
import socket

import eval_fixtures
import pytest
from test_eval_correlate import known_r_pair, write_run

import avar_ops.cli as cli
from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl
from avar_ops.analysis.vas import measure
from avar_ops.eval import get_benchmark, ids_digest, runner, sample_subset
from avar_ops.eval.runner import _result_of, _sample_dict

ARGS = ["--max-new-tokens", "4", "--no-progress", "--checker-timeout", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    return {name: eval_fixtures.WRITERS[name](os.path.join(root, name)) for name in ("mmstar", "hallusionbench")}


def _bench(data):
    # all 6 HallusionBench questions (the default image split has 5): one is asked without a figure
    return ["--bench", "mmstar=" + data["mmstar"], "hallusionbench:all=" + data["hallusionbench"]]


def _records(run, name):
    with open(os.path.join(run, "samples", name + ".jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "full")
    assert cli.main(["eval", "--model", "tiny", *_bench(data), "--batch-size", "2", "--out", out, *ARGS]) == 0
    return out


def test_eval_writes_report_and_records(full_run, capsys):
    with open(os.path.join(full_run, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert list(report["benchmarks"]) == ["mmstar", "hallusionbench"]
    settings = report["settings"]
    assert settings["extraction"] == "rule-based" and settings["checkpoint"] == "tiny"
    assert settings["max_new_tokens"] == 4 and settings["seed"] == 0 and settings["intervention"] is None
    assert settings["effective_pixels"] == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    assert "Answer with the option's letter" in settings["benchmarks"]["mmstar"]["prompt_template"]
    hall_settings = settings["benchmarks"]["hallusionbench"]
    assert (hall_settings["split"], hall_settings["options"]) == ("all", {"instruction": "none"})
    assert (hall_settings["max_new_tokens"], hall_settings["max_new_tokens_source"]) == (4, "--max-new-tokens")
    assert settings["sample"] is None and settings["limit"] is None
    star, hall = report["benchmarks"]["mmstar"], report["benchmarks"]["hallusionbench"]
    assert star["n"] == 2 and hall["n"] == 6 and {"aAcc", "fAcc", "qAcc"} <= set(hall)
    assert hall["n_vas"] == 5  # the question without a figure has no VAS
    assert report["average"]["benchmarks"] == ["mmstar", "hallusionbench"]
    assert report["average"]["vas"] == pytest.approx((star["vas"] + hall["vas"]) / 2)
    records = _records(full_run, "hallusionbench")
    samples = get_benchmark("hallusionbench").load(_hall_path(full_run), split="all")
    assert [r["id"] for r in records] == [s.id for s in samples]
    assert all(r["status"] in ("correct", "incorrect") for r in records)
    assert {(r["batch_size"], r["max_new_tokens"]) for r in records} == {(2, 4)}
    verdicts = get_benchmark("hallusionbench").verdicts(samples, [_result_of(r) for r in records])
    assert sum(verdicts) == hall["n_correct"] == round(hall["accuracy"] * 6 / 100)
    assert hall["batch_sizes"] == {"2": 6} and star["by"]["category"]["coarse perception"]["n"] == 1
    assert set(hall["by"]) == {"category", "subcategory"}
    with open(os.path.join(full_run, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| Model | MMStar | HallusionBench | Avg. |" in md and "| VAS |" in md and "rule-based" in md
    assert "| MMStar | %.3f |" % star["split"]["visual"] in md
    assert "| HallusionBench | all | instruction=none | 4 (!) | 2×6 | 6 |" in md
    assert "MMStar by category:" in md and "| fine-grained perception | 1 | 1 |" in md
    assert "HallusionBench by subcategory:" in md and "different batch sizes" not in md
    assert "under 2048 new tokens (MMStar, HallusionBench)" in md and "harness's limit" not in md  # 4 was given


def _hall_path(run):
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        return json.load(f)["benchmarks"]["hallusionbench"]["path"]


def test_vas_from_generation_equals_prefill_measurement(full_run, data):
    """The masses kept from generate's first step give the VAS a separate prefill-only forward gives."""
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    samples = get_benchmark("mmstar").load(data["mmstar"])
    report = measure(model, processor, [_sample_dict(s, None) for s in samples], progress=False)
    measured = {p["id"]: p["vas"] for p in report.per_sample}
    for record in _records(full_run, "mmstar"):
        assert record["vas"] == pytest.approx(measured[record["id"]], rel=1e-5)


def test_resume_after_interruption(full_run, data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "resumed")
    calls = {"n": 0}
    real_generate = runner.generate

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run is stopped while the second batch is generating
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", interrupted)
    capsys.readouterr()
    code = cli.main(["eval", "--model", "tiny", *_bench(data), "--batch-size", "1", "--out", out, *ARGS])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "avar eval: interrupted at sample 1 of 8 (every answered sample is saved); rerun the same command with "
        "--resume to resume"
    )
    first = _records(out, "mmstar")
    assert len(first) == 1
    with open(os.path.join(out, "samples", "mmstar.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"id": "1", "respo')  # a record cut short by the interruption
    calls["n"] = -100  # no more interruptions
    # the same command again is refused: continuing a run is asked for with --resume
    assert cli.main(["eval", "--model", "tiny", *_bench(data), "--batch-size", "2", "--out", out, *ARGS]) == 2
    assert "--resume" in capsys.readouterr().err and calls["n"] == -100
    resume = ["--resume", *ARGS]
    assert cli.main(["eval", "--model", "tiny", *_bench(data), "--batch-size", "2", "--out", out, *resume]) == 0
    # only what was missing: one mmstar batch; hallusionbench's 5 image questions in 3 batches, then the one
    # without an image alone
    assert calls["n"] == -100 + 1 + 4
    for name in ("mmstar", "hallusionbench"):
        resumed, clean = _records(out, name), _records(full_run, name)
        assert [r["id"] for r in resumed] == [r["id"] for r in clean]
        assert [r["response"] for r in resumed] == [r["response"] for r in clean]
    assert _records(out, "mmstar")[0] == first[0]  # kept, not recomputed
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        resumed_report = json.load(f)
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| MMStar | val | – | 4 (!) | 1×1, 2×1 | 2 |" in md and "different batch sizes (a resumed run)" in md
    with open(os.path.join(full_run, "report.json"), encoding="utf-8") as f:
        clean_report = json.load(f)
    # a rerun with a smaller --limit reports on fewer samples without generating anything
    calls["n"] = 0
    assert cli.main(["eval", "--model", "tiny", *_bench(data), "--limit", "1", "--out", out, *resume]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        assert json.load(f)["benchmarks"]["mmstar"]["n"] == 1
    assert calls["n"] == 0
    # the record answered before the interruption keeps its batch size: the report shows the mix
    assert resumed_report["benchmarks"]["mmstar"]["batch_sizes"] == {"1": 1, "2": 1}
    assert resumed_report["benchmarks"]["hallusionbench"]["batch_sizes"] == {"2": 6}
    for name, clean in clean_report["benchmarks"].items():
        resumed = resumed_report["benchmarks"][name]
        # batches of 1 then 2 against batches of 2: padding changes float rounding, not the answers
        assert resumed["vas"] == pytest.approx(clean["vas"], rel=1e-5)
        ignore = ("vas", "split", "batch_sizes")
        assert {k: v for k, v in resumed.items() if k not in ignore} == {
            k: v for k, v in clean.items() if k not in ignore
        }


def test_harness_limits_and_seeded_sample(data, tmp_path, monkeypatch):
    """Without --max-new-tokens each benchmark gets its harness's limit (128 for MMStar and HallusionBench in
    lmms-eval), recorded per benchmark and per record; --sample takes the seeded subset and records it."""
    seen = []
    real_generate = runner.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["max_new_tokens"])
        kwargs["max_new_tokens"] = 2  # the tiny model's answers do not matter here; keep it fast
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", spy)
    out = str(tmp_path / "run")
    argv = ["eval", "--model", "tiny", *_bench(data), "--sample", "2", "--sample-seed", "5", "--out", out]
    assert cli.main(argv + ["--no-progress", "--hallusion-instruction", "yes_no"]) == 0
    assert seen and set(seen) == {128}
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    settings = report["settings"]
    assert settings["max_new_tokens"] is None and (settings["sample"], settings["sample_seed"]) == (2, 5)
    for name in ("mmstar", "hallusionbench"):
        assert settings["benchmarks"][name]["max_new_tokens"] == 128
        assert "lmms-eval" in settings["benchmarks"][name]["max_new_tokens_source"]
        assert {r["max_new_tokens"] for r in _records(out, name)} == {128}
    assert settings["benchmarks"]["hallusionbench"]["options"] == {"instruction": "yes_no"}
    hall = get_benchmark("hallusionbench")
    expected = sample_subset(hall.load(data["hallusionbench"], split="all"), 2, 5)
    assert [r["id"] for r in _records(out, "hallusionbench")] == [s.id for s in expected]
    assert report["benchmarks"]["hallusionbench"]["ids_sha256"] == ids_digest(expected)
    assert report["benchmarks"]["hallusionbench"]["n"] == 2
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert "a seeded subset of 2 per benchmark (seed 5" in md and "| 128 (!) |" in md
    assert "may be cut before its final answer" in md and "MMStar, HallusionBench: the reference harness's limit" in md


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded for a bad command")


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--bench", "mmstar"], 2, "expected NAME=PATH"),
        (["--bench", "imagenet=/x"], 2, "benchmark: expected one of"),
        (["--bench", "mmstar:train=/x"], 2, "mmstar has no split 'train'"),
        (["--bench", "mmstar=/nonexistent/folder"], 1, "no such file or folder"),
        (["--bench", "MMSTAR=/a", "mmstar=/b"], 2, "mmstar given twice"),
        (["--bench", "mmstar=DATA", "--judge-url", "http://x"], 2, "go together"),
        (["--bench", "mmstar=DATA", "--alpha-sys", "1.5"], 2, "alpha_sys"),
        (["--bench", "mmstar=DATA", "--min-pixels", "0"], 2, "--min-pixels"),
        (["--bench", "mmstar=DATA", "--sample", "0"], 2, "--sample: expected a positive number, got 0"),
        (["--bench", "mmstar=DATA", "--limit", "-1"], 2, "--limit: expected a positive number, got -1"),
        (["--bench", "mmstar=DATA", "--batch-size", "0"], 2, "--batch-size: expected a positive number"),
        (["--bench", "mmstar=DATA", "--limit", "2", "--sample", "2"], 2, "--limit and --sample: give one"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_loading(argv, code, message, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.loading, "load_model", _no_model)
    argv = [a.replace("DATA", data["mmstar"]) for a in argv]
    assert cli.main(["eval", *argv, "--out", str(tmp_path / "o"), *ARGS]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("avar eval: error:")


def test_output_location_errors(full_run, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.loading, "load_model", _no_model)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["eval", *_bench(data), "--out", str(a_file), *ARGS]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert cli.main(["eval", *_bench(data), "--out", str(tmp_path / "no" / "such" / "run"), *ARGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a run folder is not written into as a new run, nor continued with other settings
    argv = ["eval", *_bench(data), "--out", full_run, "--max-new-tokens", "5", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert cli.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        "holds a run with other settings (" in err
        and "max_new_tokens: 4 -> 5)" in err
        and len(err.strip().splitlines()) == 1
    )
    # a second writer of one run folder is refused, naming the one that holds it
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "command": "avar eval"}
    (busy / ".avar.lock").write_text(json.dumps(holder))
    assert cli.main(["eval", *_bench(data), "--out", str(busy), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "is in use by avar eval (pid %d on host %s" % (os.getppid(), socket.gethostname()) in err
    assert sorted(os.listdir(busy)) == [".avar.lock"]
    # an empty --out is refused like every other command's, nothing written in the current folder
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert cli.main(["eval", *_bench(data), "--out", "", *ARGS]) == 2
    assert "--out: expected a folder path, got an empty string" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_correlate_command(tmp_path, capsys):
    vas, acc = known_r_pair(0.9616)
    runs = [write_run(str(tmp_path), "ckpt%d" % i, (acc[i], acc[i] + 1.0), (vas[i], vas[i] + 2.0)) for i in range(7)]
    out = str(tmp_path / "corr")
    assert cli.main(["correlate", *runs, "--out", out]) == 0
    with open(os.path.join(out, "correlation.json"), encoding="utf-8") as f:
        result = json.load(f)["correlation"]
    assert result["average"]["pearson"] == pytest.approx(0.9616, abs=1e-9)
    for name in ("correlation.png", "correlation_mathvista.png", "correlation_mmstar.png", "correlation.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "| average | 7 | 0.9616 |" in capsys.readouterr().out
    assert cli.main(["correlate", *runs[:2], "--out", out]) == 2
    assert "at least 3 run folders" in capsys.readouterr().err
    assert cli.main(["correlate", *runs[:2], str(tmp_path / "corr"), "--out", out]) == 1
    assert "no report.json" in capsys.readouterr().err
    assert cli.main(["correlate", *runs, "--out", out, "--confidence", "2"]) == 2


@pytest.mark.parametrize("family", __import__("avar_ops.analysis", fromlist=["x"]).tiny_family_names())
def test_eval_runs_on_every_family(family, data, tmp_path, capsys):
    """`avar eval --model tiny:FAMILY` grades and measures VAS on each family's tiny model; a template without a
    default system turn is said to leave VAS undefined, and --system gives one."""
    out = str(tmp_path / family)
    argv = ["eval", "--model", f"tiny:{family}", "--bench", "mmstar=" + data["mmstar"], *ARGS]
    assert cli.main([*argv, "--out", str(tmp_path / "plain")]) == 0
    with open(os.path.join(tmp_path / "plain", "report.json"), encoding="utf-8") as f:
        plain = json.load(f)
    if not plain["settings"]["template_system"]:
        assert "the chat template adds no system prompt" in capsys.readouterr().err
        assert plain["benchmarks"]["mmstar"]["n_vas"] == 0
    assert cli.main([*argv, "--system", "You are a careful visual reasoning assistant.", "--out", out]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    star = report["benchmarks"]["mmstar"]
    assert report["settings"]["checkpoint"] == f"tiny:{family}" and star["n"] == 2
    assert star["n_vas"] == 2 and star["vas"] > 0
