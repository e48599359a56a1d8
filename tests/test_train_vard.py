"""VARD synthesis end to end: `avar-train vard` against a real HTTP server on 127.0.0.1 that answers with good,
malformed, slow, failing (500), dropped and non-JSON replies; and against a fake callable, with an interruption
and a torn output line. Kept records are valid SFT data; every rejection is written with its reason; a restart
redoes only what was not finished."""

import http.server
import json
import os
import re
import threading
import time

import pytest
import yaml

from avar_ops.analysis import synthetic_images
from avar_ops.data.records import load_records
from avar_train.cli import main
from avar_train.config import load_config
from avar_train.data.vard import load_templates, run_vard, validate_output
from avar_train.data.vard_config import VARDConfig

TEMPLATES = {
    "describe.txt": "DESCRIBE {question}",
    "reason.txt": "REASON {question} || {description}",
    "anchor.txt": "ANCHOR {question} || {reasoning}",
}


def _good(rid):
    return f"<think>Looking back at the image, the square of {rid} is red.</think><answer>red</answer>"


def _reply(rid, stage):
    if stage == "describe":
        return f"Global scan: one red square ({rid})."
    if stage == "reason":
        return "The square is red. Wait, let me check: yes, red. Final answer: red"
    return {
        "malformed": "The answer is red.",
        "noanchor": "<think>It is red.</think><answer>red</answer>",
        "wrong": "<think>Looking back at the image, it is blue.</think><answer>blue</answer>",
        "dup": _good("good"),
    }.get(rid, _good(rid))


class Script:
    """What the test server does per record id (taken from the question) and stage (from the template)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = {}  # (id, stage) -> count
        self.in_flight = self.max_in_flight = 0
        self.fail_forever = {"fail"}

    def seen(self, rid):
        return sum(n for (i, _), n in self.calls.items() if i == rid)


def _server(script):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"][-1]["text"]
            stage = {"DESCRIBE": "describe", "REASON": "reason", "ANCHOR": "anchor"}[text.split()[0]]
            rid = re.search(r"\[(\w+)\]", text).group(1)
            images = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
            assert images and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
            with script.lock:
                n = script.calls.get((rid, stage), 0)
                script.calls[(rid, stage)] = n + 1
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            try:
                first = n == 0 and stage == "describe"
                if rid == "slow" and first:
                    time.sleep(2.0)  # past the client's timeout: it retries
                if rid == "drop" and first:
                    self.close_connection = True
                    self.connection.close()  # no answer at all
                    return
                if (rid == "err500" and first) or rid in script.fail_forever:
                    self._send(500, b'{"error": "internal"}')
                    return
                if rid == "garbage":
                    self._send(200, b"this is not json")
                    return
                reply = {"choices": [{"message": {"role": "assistant", "content": _reply(rid, stage)}}]}
                self._send(200, json.dumps(reply).encode())
            finally:
                with script.lock:
                    script.in_flight -= 1

        def _send(self, code, data):
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a slow answer and retried

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def _inputs(folder, ids):
    folder.mkdir(exist_ok=True)
    synthetic_images(1, seed=0)[0].save(folder / "img.png")
    path = folder / "questions.jsonl"
    with open(path, "a") as f:
        for rid in ids:
            f.write(
                json.dumps(
                    {"id": rid, "image": "img.png", "question": f"[{rid}] What colour is the square?", "answer": "red"}
                )
                + "\n"
            )
    return path


def _templates(folder):
    folder.mkdir()
    for name, text in TEMPLATES.items():
        (folder / name).write_text(text)
    return folder


def _rows(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_vard_over_http_end_to_end(tmp_path, capsys):
    script = Script()
    server = _server(script)
    try:
        ids = ["good", "malformed", "noanchor", "wrong", "slow", "err500", "drop", "garbage", "fail"]
        inputs = _inputs(tmp_path / "in", ids)
        out = tmp_path / "out"
        config = tmp_path / "vard.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "input_file": str(inputs),
                    "output_dir": str(out),
                    "templates_dir": str(_templates(tmp_path / "tpl")),
                    "generator": "http",
                    "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                    "model": "served",
                    "timeout": 1.0,
                    "max_retries": 2,
                    "retry_backoff": 0.01,
                    "concurrency": 3,
                }
            )
        )
        assert main(["vard", "--config", str(config)]) == 0
        line = capsys.readouterr().out
        assert "4 kept, 5 rejected" in line
        kept = _rows(out / "vard.jsonl")
        assert sorted(r["id"] for r in kept) == ["drop", "err500", "good", "slow"]
        reasons = {r["id"]: r["reason"] for r in _rows(out / "rejects.jsonl")}
        assert reasons["malformed"].startswith("format:")
        assert reasons["noanchor"].startswith("anchors: 0 visual anchor")
        assert reasons["wrong"].startswith("answer: 'blue' does not match the reference 'red'")
        assert reasons["garbage"].startswith("generator_error:") and "not JSON" in reasons["garbage"]
        assert reasons["fail"].startswith("generator_error:") and "500" in reasons["fail"]
        assert script.calls[("slow", "describe")] == 2 and script.calls[("err500", "describe")] == 2
        assert script.calls[("drop", "describe")] == 2 and script.calls[("fail", "describe")] == 3  # 1 + 2 retries
        assert script.max_in_flight <= 3
        summary = json.loads((out / "summary.json").read_text())
        assert summary["kept"] == 4 and summary["rejected"] == {
            "anchors": 1,
            "answer": 1,
            "format": 1,
            "generator_error": 2,
        }
        # The kept file is SFT data in its own folder, images included.
        sft = load_records(str(out / "vard.jsonl"), use="sft").records
        assert {r.id: r.target for r in sft}["good"] == _good("good")
        assert all(os.path.dirname(p) == str(out / "images") for r in sft for p in r.images)

        # Restart: finished ids are skipped, generator errors retried, a torn last line cut off, a new record that
        # repeats a kept response rejected as a duplicate.
        script.fail_forever = set()
        calls_before = {rid: script.seen(rid) for rid in ids}
        with open(out / "vard.jsonl", "a") as f:
            f.write('{"id": "torn", "resp')
        _inputs(tmp_path / "in", ["dup"])
        assert main(["vard", "--config", str(config), "resume=true"]) == 0
        assert "1 kept, 2 rejected" in capsys.readouterr().out  # fail kept; garbage again, dup
        for rid in ids:
            if rid not in ("garbage", "fail"):
                assert script.seen(rid) == calls_before[rid], rid
        kept = _rows(out / "vard.jsonl")
        assert sorted(r["id"] for r in kept) == ["drop", "err500", "fail", "good", "slow"]
        assert {r["id"]: r["reason"] for r in _rows(out / "rejects.jsonl")}["dup"].startswith("duplicate:")
        # garbage failed again the same way: rejects.jsonl holds that row once
        rows = [json.dumps(r, sort_keys=True) for r in _rows(out / "rejects.jsonl")]
        assert len(rows) == len(set(rows)) and sum('"garbage"' in r for r in rows) == 1
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------- fake callable


class FakeGenerator:
    """A callable generator; it raises KeyboardInterrupt on the record named `interrupt_on` (once)."""

    def __init__(self, interrupt_on=None):
        self.interrupt_on = interrupt_on
        self.calls = []

    def __call__(self, messages, images):
        text = messages[-1]["content"][-1]["text"]
        rid = re.search(r"\[(\w+)\]", text).group(1)
        stage = {"DESCRIBE": "describe", "REASON": "reason", "ANCHOR": "anchor"}[text.split()[0]]
        assert len(images) == 1 and images[0].mode == "RGB"
        assert [p["type"] for p in messages[-1]["content"]] == ["image", "text"]
        self.calls.append((rid, stage))
        if rid == self.interrupt_on:
            self.interrupt_on = None
            raise KeyboardInterrupt
        return _reply(rid, stage)


def callable_config(tmp_path, ids) -> VARDConfig:
    """A run over records `ids` with the test templates, one at a time, for a generator passed to run_vard."""
    return VARDConfig(
        input_file=str(_inputs(tmp_path / "in", ids)),
        output_dir=str(tmp_path / "out"),
        templates_dir=str(_templates(tmp_path / "tpl")),
        generator="unused:callable",
        concurrency=1,
        answer_check=False,
    ).validate()


def test_vard_fake_callable_interrupt_and_resume(tmp_path):
    cfg = callable_config(tmp_path, ["a", "b", "c", "malformed", "d"])
    first = FakeGenerator(interrupt_on="c")
    with pytest.raises(KeyboardInterrupt):
        run_vard(cfg, generator=first)
    assert [r["id"] for r in _rows(tmp_path / "out" / "vard.jsonl")] == ["a", "b"]
    second = FakeGenerator()
    summary = run_vard(cfg, generator=second)
    assert {rid for rid, _ in second.calls} == {"c", "malformed", "d"}  # a and b are not asked again
    assert summary.kept == 2 and summary.skipped == 2 and summary.rejected == {"format": 1}
    assert [r["id"] for r in _rows(tmp_path / "out" / "vard.jsonl")] == ["a", "b", "c", "d"]
    # Stage order and conditioning: each stage's prompt holds the previous stage's output.
    assert [s for rid, s in second.calls if rid == "d"] == ["describe", "reason", "anchor"]


def test_vard_templates_and_validation(tmp_path):
    shipped = load_templates()
    assert "{description}" in shipped.reason and "{reasoning}" in shipped.anchor
    assert "<think>" in shipped.anchor and "Global scan" in shipped.describe
    bad = _templates(tmp_path / "tpl")
    (bad / "reason.txt").write_text("REASON without the description")
    with pytest.raises(Exception, match=r"reason.txt must contain \['\{description\}', '\{question\}'\]"):
        load_templates(str(bad))
    phrases = ["look back at", "looking back at"]
    assert validate_output(_good("x"), "red", anchor_phrases=phrases, min_anchors=1) is None
    assert validate_output(
        "<think>x</think><answer> </answer>", None, anchor_phrases=phrases, min_anchors=0
    ).startswith("format: empty")
    assert validate_output(
        "<think>Let me look back at it.</think><answer>3</answer>", None, anchor_phrases=phrases, min_anchors=2
    ).startswith("anchors: 1")
    with pytest.raises(ValueError, match="base_url: must be an http"):
        load_config(
            VARDConfig,
            str(
                _write(
                    tmp_path / "c.yaml",
                    input_file=str(_inputs(tmp_path / "in", ["a"])),
                    output_dir=str(tmp_path / "o"),
                    generator="http",
                )
            ),
        )


def _write(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def test_vard_local_hf_generator(tmp_path):
    """The local-model generator runs the three stages on the tiny model; its random text fails validation, and
    the rejection says so."""
    from sft_fixtures import tiny_pair

    from avar_train.data.vard import HFGenerator

    model, processor = tiny_pair()
    generator = HFGenerator(model, processor, max_new_tokens=4, temperature=0.0)
    cfg = VARDConfig(
        input_file=str(_inputs(tmp_path / "in", ["a"])),
        output_dir=str(tmp_path / "out"),
        generator="hf",
        model="tiny",
        answer_check=False,
    ).validate()
    summary = run_vard(cfg, generator=generator)
    assert summary.kept == 0 and summary.rejected == {"format": 1}
    (row,) = _rows(tmp_path / "out" / "rejects.jsonl")
    assert row["stage"] == "validate" and row["description"] and isinstance(row["response"], str)
