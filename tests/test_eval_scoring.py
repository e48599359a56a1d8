"""`avar eval` end to end with scripted responses: each benchmark's answer is scored by its official rule (or the
strict one under --scoring strict) through the runner, every record keeps the rule, mode and flag, and the report
counts the flagged verdicts."""

import json
import os

import eval_fixtures
import pytest

import avar_ops.cli as cli
from avar_ops.eval import runner
from avar_ops.grading.scorers import mmmu_guess
from avar_ops.hf import template_tokens

ARGS = ["--max-new-tokens", "2", "--no-progress", "--checker-timeout", "3", "--batch-size", "2"]

# sample id -> the response the model is made to give
SCRIPT = {
    # MathVista: the option's text instead of its letter maps to that option; 7.6 for the integer 7 is right only
    # by the official int() truncation
    "1": "45°",
    "2": "The length is 2.44 cm.",
    "3": "7.6",
    # MMMU: no letter at all (the official seeded guess), a letter, an open answer
    "validation_Art_1": "I am not sure.",
    "validation_Art_2": "The answer is (B).",
    "validation_Math_3": "So x is 24.",
    # HallusionBench (gt yes, no, no, yes, no, yes): the last, a VS question without its figure, hedges
    "VD_illusion_0_0_0": "Yes.",
    "VD_illusion_0_0_1": "No.",
    "VD_illusion_0_1_0": "No.",
    "VD_illusion_0_1_1": "Yes, it is.",
    "VS_chart_1_1_0": "No.",
    "VS_chart_1_0_0": "It could be yes or no.",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    return {n: eval_fixtures.WRITERS[n](os.path.join(root, n)) for n in ("mathvista", "mmmu", "hallusionbench")}


def _script(monkeypatch):
    """The tiny model generates as usual (VAS and records need its prefill); its decoded text is replaced by the
    script's response for the sample at that place of the batch."""
    batch = {"ids": [], "next": 0}
    real_build, real_load = runner.build_inputs, cli.loading.load_model

    def build(processor, samples, **kwargs):
        batch["ids"], batch["next"] = [s["id"] for s in samples], 0
        return real_build(processor, samples, **kwargs)

    def load(*args, **kwargs):
        model, processor, label = real_load(*args, **kwargs)

        def decode(tokens, skip_special_tokens=True):
            sample_id = batch["ids"][batch["next"]]
            batch["next"] += 1
            return SCRIPT[sample_id]

        template_tokens(processor)  # the template's layout is learned (with the real decode) before scripting it
        processor.tokenizer.decode = decode
        return model, processor, label

    monkeypatch.setattr(runner, "build_inputs", build)
    monkeypatch.setattr(cli.loading, "load_model", load)


def _run(data, out, monkeypatch, *extra):
    _script(monkeypatch)
    bench = ["mathvista=" + data["mathvista"], "mmmu=" + data["mmmu"], "hallusionbench:all=" + data["hallusionbench"]]
    assert cli.main(["eval", "--model", "tiny", "--bench", *bench, "--out", out, *ARGS, *extra]) == 0
    records = {}
    for name in ("mathvista", "mmmu", "hallusionbench"):
        with open(os.path.join(out, "samples", name + ".jsonl"), encoding="utf-8") as f:
            records.update({r["id"]: r for r in map(json.loads, f)})
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert set(records) == set(SCRIPT) and all(records[i]["response"] == SCRIPT[i] for i in SCRIPT)
    return records, report, md


def _correct(record):
    return record["status"] == "correct"


def test_official_rules_through_the_runner(data, tmp_path, monkeypatch):
    records, report, md = _run(data, str(tmp_path / "official"), monkeypatch)
    assert report["settings"]["scoring"] == "official"
    assert {r["mode"] for r in records.values()} == {"official"}
    # MathVista: the option's text is that option (B), not a similarity mapping; int() truncation accepts 7.6
    assert (records["1"]["extracted"], records["1"]["flagged"], _correct(records["1"])) == ("B", False, True)
    assert records["1"]["rule"].endswith("option_text")
    assert _correct(records["2"]) and _correct(records["3"]) and records["3"]["rule"].endswith("int()")
    # MMMU: no letter -> the seeded guess, flagged; right exactly when the guess is the reference
    guess = records["validation_Art_1"]
    expected = mmmu_guess("validation_Art_1", "ABC")
    assert (guess["rule"], guess["extracted"], guess["flagged"]) == ("random_guess", expected, True)
    assert _correct(guess) == (expected == "B")
    assert _correct(records["validation_Art_2"]) and not records["validation_Art_2"]["flagged"]
    assert _correct(records["validation_Math_3"])
    # HallusionBench: the hedge to the question without a figure is right by the official rule, and flagged
    hedge = records["VS_chart_1_0_0"]
    assert (_correct(hedge), hedge["flagged"], hedge["rule"]) == (True, True, "unclear_without_figure")
    assert all(_correct(records[i]) for i in SCRIPT if i.startswith(("VD_", "VS_")))
    rows = report["benchmarks"]
    assert (rows["mathvista"]["n_flagged"], rows["mmmu"]["n_flagged"], rows["hallusionbench"]["n_flagged"]) == (0, 1, 1)
    assert rows["hallusionbench"]["aAcc"] == 100.0 and rows["mathvista"]["accuracy"] == 100.0
    assert rows["mmmu"]["n_correct"] == 2 + (expected == "B")
    assert "| flagged |" in md and "| MMMU | 3 | 3 | %d | 1 |" % rows["mmmu"]["n_correct"] in md
    assert "| HallusionBench | 6 | 6 | 6 | 1 |" in md
    assert "- scoring: official (each benchmark's official rule)" in md


def test_strict_rules_through_the_runner(data, tmp_path, monkeypatch):
    records, report, md = _run(data, str(tmp_path / "strict"), monkeypatch, "--scoring", "strict")
    assert report["settings"]["scoring"] == "strict"
    assert {r["mode"] for r in records.values()} == {"strict"}
    assert not any(r["flagged"] for r in records.values())
    # what the official rule accepts by guess, truncation or hedge is wrong here; the rest is unchanged
    assert not _correct(records["validation_Art_1"]) and records["validation_Art_1"]["extracted"] is None
    assert not _correct(records["3"]) and not _correct(records["VS_chart_1_0_0"])
    assert _correct(records["1"]) and _correct(records["2"]) and _correct(records["validation_Math_3"])
    rows = report["benchmarks"]
    assert [rows[n]["n_flagged"] for n in ("mathvista", "mmmu", "hallusionbench")] == [0, 0, 0]
    assert (rows["mathvista"]["n_correct"], rows["mmmu"]["n_correct"], rows["hallusionbench"]["n_correct"]) == (2, 2, 5)
    assert "- scoring: strict" in md and "| HallusionBench | 6 | 6 | 5 | 0 |" in md


def test_scoring_mode_is_part_of_the_run(data, tmp_path, monkeypatch, capsys):
    """A run scored one way is not continued the other way (its records hold the other mode's verdicts)."""
    out = str(tmp_path / "run")
    _run(data, out, monkeypatch)
    capsys.readouterr()
    argv = ["eval", "--model", "tiny", "--bench", "mmmu=" + data["mmmu"], "--out", out, *ARGS]
    assert cli.main(argv + ["--scoring", "strict", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scoring: 'official' -> 'strict'" in err[0], err
