"""Judge mode against a scripted local server (loopback only): what the judge is asked per benchmark, how its
replies become verdicts, the per-sample cache, and a server that is down or goes down (one line, resumable)."""

import json
import os
import socket

import eval_fixtures
import pytest
from test_chat_client import FakeServer

import avar_ops.cli as cli
from avar_ops.eval import Judge, JudgeError, get_benchmark
from avar_ops.grading import ChatClient


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    return {n: eval_fixtures.WRITERS[n](os.path.join(root, n)) for n in ("mathvista", "mathverse", "hallusionbench")}


def _client(server, retries=0):
    return ChatClient(server.url, "judge-7b", concurrency=1, max_retries=retries)


def test_hallusionbench_judge_verdicts_and_unclear_rule(data, tmp_path):
    hall = get_benchmark("hallusionbench")
    samples = hall.load(data["hallusionbench"], split="all")
    replies = ["Correct.", "incorrect", "correct", "Unclear", "**Incorrect**", "unclear"]
    with FakeServer([("ok", r) for r in replies]) as server:
        judge = Judge(_client(server), cache_dir=str(tmp_path / "judge"))
        checks, outputs = judge.check("hallusionbench", samples, ["r%d" % i for i in range(6)])
        prompt = server.requests[0][2]["messages"][-1]["content"]
    assert "Is the left line longer? (VD/0/0)" in prompt and "Reference answer: yes" in prompt and "r0" in prompt
    # "unclear" is right only for the VS question asked without its figure (the last one): the scorer's rule
    assert [c.status for c in checks] == ["correct", "incorrect", "correct", "incorrect", "incorrect", "correct"]
    assert [o["score"] for o in outputs] == replies
    assert checks[5].rule == "judge/unclear_without_figure" and checks[3].detail == "unclear"
    assert hall.verdicts(samples, checks) == [True, False, True, False, False, True]


def test_mathverse_two_steps_and_mathvista_extraction(data, tmp_path):
    verse = get_benchmark("mathverse")
    samples = verse.load(data["mathverse"])
    script = [("ok", "B"), ("ok", "1/2"), ("ok", "4 cm"), ("ok", "1"), ("ok", " 1"), ("ok", "maybe")]
    with FakeServer(script) as server:
        judge = Judge(_client(server), cache_dir=str(tmp_path / "judge"))
        checks, outputs = judge.check("mathverse", samples, ["resp a", "resp b", "resp c"])
        scoring = server.requests[3][2]["messages"][-1]["content"]
    assert "Question: q\nStandard answer: B" in scoring and "Model's answer: B" in scoring  # question_for_eval
    assert [c.status for c in checks] == ["correct", "correct", "error"]  # "maybe" is neither 1 nor 0
    assert [c.extracted for c in checks] == ["B", "1/2", "4 cm"] and checks[0].rule == "judge"
    assert outputs[2] == {"extract": "4 cm", "score": "maybe"}
    vista = get_benchmark("mathvista")
    samples = vista.load(data["mathvista"])
    with FakeServer([("ok", "B"), ("ok", "2.44"), ("ok", "NONE")]) as server:
        judge = Judge(_client(server))
        checks, _ = judge.check("mathvista", samples, ["x", "y", "z"])
        assert "Hint: answer with the option letter." in server.requests[0][2]["messages"][-1]["content"]
    # the judge extracts, MathVista's scorer compares (the official pipeline)
    assert [c.status for c in checks] == ["correct", "correct", "incorrect"]
    assert checks[0].rule.startswith("judge/") and checks[0].mode == "official"
    with pytest.raises(ValueError, match="mmstar is scored without a model"):
        judge.check("mmstar", [], [])


def test_cache_per_sample_survives_a_new_judge_and_a_cut_line(data, tmp_path):
    hall = get_benchmark("hallusionbench")
    samples = hall.load(data["hallusionbench"])
    cache = str(tmp_path / "judge")
    with FakeServer([("ok", "correct")] * 5) as server:
        Judge(_client(server), cache_dir=cache).check("hallusionbench", samples, ["a"] * 5)
        assert len(server.requests) == 5
    with open(os.path.join(cache, "hallusionbench.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"key": "abc", "outp')  # cut short by an interruption
    with FakeServer([("ok", "incorrect")] * 5) as server:
        judge = Judge(_client(server), cache_dir=cache)
        checks, _ = judge.check("hallusionbench", samples, ["a"] * 4 + ["changed"])
        assert len(server.requests) == 1  # only the sample whose response changed is asked again
    assert [c.status for c in checks] == ["correct"] * 4 + ["incorrect"]
    with open(os.path.join(cache, "hallusionbench.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["output"] == "incorrect"
    # another judge model does not reuse these replies
    with FakeServer([("ok", "correct")] * 5) as server:
        other = Judge(ChatClient(server.url, "other", concurrency=1, max_retries=0), cache_dir=cache)
        other.check("hallusionbench", samples, ["a"] * 5)
        assert len(server.requests) == 5


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return "http://127.0.0.1:%d/v1" % port


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded when the judge cannot be reached")


def _argv(data, out, url):
    return [
        *("eval", "--model", "tiny", "--bench", "hallusionbench:all=" + data["hallusionbench"], "--out", out),
        *("--max-new-tokens", "2", "--no-progress", "--judge-url", url, "--judge-model", "judge-7b"),
        *("--judge-retries", "0"),
    ]


def test_judge_down_is_one_line_before_the_model_loads(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.loading, "load_model", _no_model)
    assert cli.main(_argv(data, str(tmp_path / "run"), _closed_port_url())) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avar eval: error: --judge-url: http://127.0.0.1:")
    assert "does not answer" in err and "Traceback" not in err


def test_judge_run_report_and_resume_after_the_judge_goes_down(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    # the ping, then the first batch's question, then the server fails for good
    with FakeServer([("ok", "OK"), ("ok", "correct"), (500, '{"error": "down"}')]) as server:
        code = cli.main(_argv(data, out, server.url) + ["--batch-size", "1"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "answered 500" in err
        and "rerun the same command with --resume to continue" in err
    )
    with open(os.path.join(out, "samples", "hallusionbench.jsonl"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 1  # the first answer is kept
    with FakeServer([("ok", "OK")] + [("ok", "incorrect")] * 5) as server:
        assert cli.main(_argv(data, out, server.url) + ["--batch-size", "1", "--resume"]) == 0
        assert len(server.requests) == 1 + 5  # the ping and the five questions not judged yet
        url = server.url
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    # the judge's address changed between the two runs: its model names the mode, the address is recorded
    assert report["settings"]["extraction"] == "judge:judge-7b"
    assert report["settings"]["judge_url"] == url + "/chat/completions"
    hall = report["benchmarks"]["hallusionbench"]
    assert hall["n"] == 6 and hall["n_correct"] == 1 and hall["extraction_methods"] == {"judge": 6}
    with open(os.path.join(out, "samples", "hallusionbench.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["judge_output"]["score"] for r in records] == ["correct"] + ["incorrect"] * 5
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        assert "answer extraction: judge:judge-7b at http://127.0.0.1:" in f.read()


def test_judge_error_type():
    assert issubclass(JudgeError, RuntimeError)
