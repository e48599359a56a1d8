"""Runs you can trust: the run-folder policy (resume / overwrite / settings / lock), whole checkpoints, no silent
early stop on a bad record, Ctrl-C, and per-run logs and rejects, through the `avar-train` command line on the
tiny Qwen2.5-VL and through `avar_ops.data`'s policy directly."""

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml
from sft_fixtures import tiny_pair, write_sft_records

from avar_ops.data import (
    CHECKPOINT_MARKER,
    LOCK_FILE,
    RUN_FILE,
    RunFolderError,
    finish_checkpoint,
    latest_checkpoint,
    load_records,
    open_run_folder,
    staging_folder,
    truncate_log,
)
from avar_train.cli import main
from avar_train.data.collator import QwenVLCollator
from avar_train.sft.trainer import AGTOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ the policy itself


def test_new_run_refuses_a_used_folder_and_resume_checks_settings(tmp_path):
    out = str(tmp_path / "run")
    with open_run_folder(out, "avar-train sft", {"alpha": 0.15, "workers": 0}, resumable=("workers",)) as run:
        assert run.mode == "new"
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            f.write('{"step": 1}\n')
    with pytest.raises(RunFolderError, match="--resume to continue it or --overwrite to replace it"):
        open_run_folder(out, "avar-train sft", {"alpha": 0.15, "workers": 0})
    with pytest.raises(RunFolderError, match=r"other settings \(alpha: 0.15 -> 0.3\)"):
        open_run_folder(out, "avar-train sft", {"alpha": 0.3, "workers": 0}, resume=True, resumable=("workers",))
    with pytest.raises(RunFolderError, match="holds a run of `avar-train sft`, not `avar-train grpo`"):
        open_run_folder(out, "avar-train grpo", {"alpha": 0.15}, resume=True)
    # a resumable setting may change
    with open_run_folder(
        out, "avar-train sft", {"alpha": 0.15, "workers": 4}, resume=True, resumable=("workers",)
    ) as r:
        assert r.mode == "resume"
    assert os.path.isfile(os.path.join(out, "log.jsonl"))
    with open_run_folder(out, "avar-train sft", {"alpha": 0.3}, overwrite=True) as r:
        assert r.mode == "overwrite"
    assert sorted(os.listdir(out)) == [RUN_FILE]  # the old run's files are gone, the lock released
    with open(os.path.join(out, RUN_FILE)) as f:
        assert json.load(f)["settings"] == {"alpha": 0.3}


def test_a_folder_without_a_run_is_never_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match="holds no avar run"):
            open_run_folder(str(tmp_path), "avar vas", {}, **flags)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(RunFolderError, match="--out: expected a folder path, got an empty string"):
        open_run_folder("", "avar eval", {})


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    # a live process of this host (our parent) and a process of another host: both hold the folder
    for pid, where in ((os.getppid(), host), (1234, "elsewhere")):
        (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": where, "command": "avar-train vard"}))
        with pytest.raises(RunFolderError) as info:
            open_run_folder(str(out), "avar-train vard", {})
        assert f"in use by avar-train vard (pid {pid} on host {where}" in str(info.value)
        assert "\n" not in str(info.value)
    # a dead process of this host: its lock is stale, taken over with a note
    dead = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead, "host": host, "command": "avar-train vard"}))
    notes = []
    run = open_run_folder(str(out), "avar-train vard", {}, note=notes.append)
    assert notes == [
        f"avar-train vard: note: taking over the lock of pid {dead} on host {host}, which is no longer running"
    ]
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    run.release()
    assert not (out / LOCK_FILE).exists()


def test_latest_checkpoint_skips_half_written_ones(tmp_path):
    for step in (2, 4):
        staging = staging_folder(str(tmp_path), f"checkpoint-{step}")
        os.makedirs(staging)
        (open(os.path.join(staging, "model.bin"), "w")).close()
        finish_checkpoint(staging, str(tmp_path / f"checkpoint-{step}"), {"step": step})
    # killed while saving: only config.json, no marker; and a staging folder never renamed
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "config.json").write_text("{}")
    os.makedirs(staging_folder(str(tmp_path), "checkpoint-8"))
    notes = []
    assert latest_checkpoint(str(tmp_path), note=notes.append) == str(tmp_path / "checkpoint-4")
    assert len(notes) == 1 and "checkpoint-6" in notes[0] and "not a whole checkpoint" in notes[0]
    assert os.path.isfile(tmp_path / "checkpoint-4" / CHECKPOINT_MARKER)


def test_truncate_log_keeps_one_run(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert truncate_log(str(path), 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_rejects_gain_no_duplicate_rows_on_rerun(tmp_path):
    data = write_sft_records(str(tmp_path), n=2)
    with open(data, "a") as f:
        f.write('{"id": "bad", "question": 3}\n')
    rejects = str(tmp_path / "out" / "rejects.jsonl")
    for _ in range(3):
        loaded = load_records(data, use="sft", on_error="skip", rejects_path=rejects)
        assert loaded.rejected == 1
    with open(rejects) as f:
        assert len(f.read().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- SFT runs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_pair()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def _recipe(tmp_path, tiny_dir, train_file, **values):
    recipe = dict(
        model_name_or_path=tiny_dir,
        train_file=train_file,
        max_length=256,
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        max_steps=6,
        per_device_train_batch_size=1,
        logging_steps=1,
    )
    recipe.update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [row["step"] for row in map(json.loads, f) if "loss_lm" in row]


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("avar-train")]


def test_a_record_that_fails_in_the_collator_stops_the_run(tiny_dir, tmp_path, monkeypatch, capsys):
    """8 good records and one the processor fails on with StopIteration (which a DataLoader would read as the
    end of the data): the run stops with the record's id, exit 1, and no final model as if it had completed."""
    data = write_sft_records(str(tmp_path / "data"), n=9)
    real = QwenVLCollator._encode

    def encode(self, record):
        if record.id == "r4":
            raise StopIteration  # what the processor raised on the record of the issue
        return real(self, record)

    monkeypatch.setattr(QwenVLCollator, "_encode", encode)
    out = tmp_path / "out"
    code = main(["sft", "--config", _recipe(tmp_path, tiny_dir, data, max_steps=20), f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert _error_lines(err) == [
        "avar-train sft: error: record 'r4': cannot be processed (StopIteration: no message)"
    ], err
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert "finished" not in json.loads((out / RUN_FILE).read_text())


def test_sft_interrupt_resume_overwrite(tiny_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 3: one line, exit 130, a whole checkpoint-3. The same command again is refused;
    resume=true skips a half-written newer checkpoint, continues to step 6 with one log, and leaves a final model
    that from_pretrained(output_dir) loads although save_steps > 0; resuming other settings is refused;
    overwrite=true starts again."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    data = write_sft_records(str(tmp_path / "data"), n=4)
    recipe = _recipe(tmp_path, tiny_dir, data, save_steps=2)
    out = str(tmp_path / "out")
    argv = ["sft", "--config", recipe, f"output_dir={out}"]
    real = AGTOTrainer.training_step
    sent = []

    def step(self, *args, **kwargs):
        if self.state.global_step == 2 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 3 runs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AGTOTrainer, "training_step", step)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        _error_lines(err)[-1] == "avar-train: interrupted at step 3; rerun the same command with resume=true to resume"
    )
    assert _steps(out) == [1, 2, 3]
    for step in (2, 3):
        assert os.path.isfile(os.path.join(out, f"checkpoint-{step}", CHECKPOINT_MARKER))
    assert not os.path.exists(os.path.join(out, "config.json"))  # no final model: the run did not complete

    assert main(argv) == 2
    assert "pass resume=true to continue it or overwrite=true" in capsys.readouterr().err

    os.makedirs(os.path.join(out, "checkpoint-5"))  # a save killed half-way
    with open(os.path.join(out, "checkpoint-5", "config.json"), "w") as f:
        f.write("{}")
    assert main([*argv, "resume=true"]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-5" in err
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert os.path.isfile(os.path.join(out, "checkpoint-4", CHECKPOINT_MARKER))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert model.config.text_config.num_hidden_layers >= 1 and processor.tokenizer is not None
    assert json.loads(open(os.path.join(out, RUN_FILE)).read())["finished"]

    assert main([*argv, "resume=true", "alpha=0.5"]) == 2
    assert "alpha: 0.15 -> 0.5" in capsys.readouterr().err
    assert main([*argv, "resume=true", "save_steps=3"]) == 2  # Trainer would ignore it: refused, not ignored
    assert "save_steps: 2 -> 3" in capsys.readouterr().err
    assert main([*argv, "overwrite=true", "max_steps=2"]) == 0
    assert _steps(out) == [1, 2]
    assert not os.path.exists(os.path.join(out, "checkpoint-3"))


def test_agto_skip_logs_the_image_mass_of_the_samples_it_trains_on(tiny_dir, tmp_path, capsys):
    """A batch of one image record and one text-only record under agto_empty=skip logs, at step 1 (weights not yet
    updated), the image mass of the image record alone: the same as a run on the image record by itself."""
    folder = tmp_path / "data"
    image_only = write_sft_records(str(folder), n=1)
    mixed = str(folder / "mixed.jsonl")
    with open(image_only) as f, open(mixed, "w") as g:
        g.write(f.read())
        g.write(json.dumps({"id": "t0", "system": "Answer briefly.", "question": "Say hi.", "response": "Hi."}) + "\n")
    logs = {}
    for name, data, batch in (("alone", image_only, 1), ("mixed", mixed, 2)):
        out = tmp_path / name
        recipe = _recipe(tmp_path, tiny_dir, data, max_steps=1, per_device_train_batch_size=batch, agto_empty="skip")
        assert main(["sft", "--config", recipe, f"output_dir={out}"]) == 0, capsys.readouterr().err
        with open(out / "log.jsonl") as f:
            logs[name] = next(row for row in map(json.loads, f) if "image_mass" in row)
    assert logs["mixed"]["agto_samples"] == 0.5
    assert logs["alone"]["image_mass"] > 0
    assert logs["mixed"]["image_mass"] == pytest.approx(logs["alone"]["image_mass"], rel=1e-4)
    assert logs["mixed"]["vas"] == pytest.approx(logs["alone"]["vas"], rel=1e-4)


@pytest.mark.parametrize("command", ["sft", "grpo", "vard"])
def test_a_second_writer_is_refused_in_one_line(command, tiny_dir, tmp_path, capsys):
    """A folder another live process holds: refused before any model loads or request goes out, naming the
    holder; two runs never write one folder (no duplicate ids in vard.jsonl, no shared temporary files)."""
    data = write_sft_records(str(tmp_path / "data"), n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "x"}))
    if command == "sft":
        argv = ["--config", _recipe(tmp_path, tiny_dir, data)]
    elif command == "grpo":
        with open(data) as f:
            rows = [dict(json.loads(line), answer="red") for line in f]
        with open(data, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        argv = ["--config", os.path.join(ROOT, "training", "configs", "grpo_tiny.yaml"), f"train_file={data}"]
    else:
        recipe = tmp_path / "vard.yaml"
        recipe.write_text(yaml.safe_dump({"input_file": data, "base_url": "http://127.0.0.1:9/v1", "model": "m"}))
        argv = ["--config", str(recipe)]
    assert main([command, *argv, f"output_dir={out}"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"pid {os.getppid()} on host {socket.gethostname()}" in lines[0], lines
    assert sorted(os.listdir(out)) == [LOCK_FILE]


# ---------------------------------------------------------------------------------------------------- GRPO


def test_grpo_interrupt_resume_and_final_model(tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 2 of 3: a whole checkpoint-2, one line, exit 130; resume=true runs step 3 only, the log
    holds steps 1, 2, 3 once each, and the final policy and processor load from output_dir."""
    from grpo_fixtures import write_colour_task
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from avar_train.grpo.trainer import GRPOTrainer

    data = write_colour_task(str(tmp_path / "data"), n=4)
    out = str(tmp_path / "out")
    recipe = os.path.join(ROOT, "training", "configs", "grpo_tiny.yaml")
    argv = ["grpo", "--config", recipe, f"train_file={data}", f"output_dir={out}", "max_steps=3", "save_steps=0"]
    argv.append("accuracy_checker=grpo_fixtures:initial_checker")
    real = GRPOTrainer.train_step
    sent = []

    def step(self):
        if self.step == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(GRPOTrainer, "train_step", step)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        _error_lines(err)[-1] == "avar-train: interrupted at step 2; rerun the same command with resume=true to resume"
    )
    assert os.path.isfile(os.path.join(out, "checkpoint-2", CHECKPOINT_MARKER))
    assert main([*argv, "resume=true"]) == 0, capsys.readouterr().err
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [row["step"] for row in map(json.loads, f)] == [1, 2, 3]
    assert os.path.isfile(os.path.join(out, "checkpoint-3", CHECKPOINT_MARKER))
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    AutoProcessor.from_pretrained(out, local_files_only=True)


def test_grpo_stops_on_a_record_that_fails_in_the_collator(tmp_path, monkeypatch, capsys):
    from grpo_fixtures import write_colour_task

    data = write_colour_task(str(tmp_path / "data"), n=4)
    real = QwenVLCollator._encode

    def encode(self, record):
        if record.id == "c2":
            raise StopIteration
        return real(self, record)

    monkeypatch.setattr(QwenVLCollator, "_encode", encode)
    out = tmp_path / "out"
    recipe = os.path.join(ROOT, "training", "configs", "grpo_tiny.yaml")
    argv = ["grpo", "--config", recipe, f"train_file={data}", f"output_dir={out}", "max_steps=8", "save_steps=0"]
    assert main(argv) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert lines == ["avar-train grpo: error: record 'c2': cannot be processed (StopIteration: no message)"]
    assert not (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------------- VARD


class _SlowServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _slow_server(seconds: float):
    """A chat-completions server on 127.0.0.1 that answers each request after `seconds` (or when released)."""
    received = threading.Event()
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            received.set()
            release.wait(seconds)
            body = json.dumps({"choices": [{"message": {"content": "late"}}]}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass

    server = _SlowServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received, release


def test_vard_ctrl_c_cancels_requests_in_flight(tmp_path):
    """The server takes 60 s per request; Ctrl-C once two requests are in flight stops the command within a few
    seconds (it used to wait for every stage of the records in flight), in one line with exit 130."""
    data = write_sft_records(str(tmp_path / "data"), n=4)
    server, received, release = _slow_server(60.0)
    try:
        recipe = tmp_path / "vard.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "input_file": data,
                    "output_dir": str(tmp_path / "out"),
                    "generator": "http",
                    "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                    "model": "served",
                    "timeout": 120.0,
                    "max_retries": 3,
                    "concurrency": 2,
                    "answer_check": False,
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "avar_train.cli", "vard", "--config", str(recipe)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []  # (seconds after Ctrl-C, line) of stderr
        start = [None]

        def read_stderr():
            for line in proc.stderr:
                lines.append((None if start[0] is None else time.monotonic() - start[0], line.rstrip("\n")))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            assert received.wait(120), "the server never got a request"
            time.sleep(0.5)
            start[0] = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)  # the server would hold each of the three stages for 60 s
            reader.join(5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, lines
        assert not any("Traceback" in line for _, line in lines)
        said = [(t, line) for t, line in lines if line.startswith("avar-train")]
        assert len(said) == 1 and re.match(
            r"avar-train: interrupted; finished records are in .*resume=true", said[0][1]
        )
        # The command has stopped when it says so; what follows is the interpreter's own exit (torch's teardown).
        assert said[0][0] < 2.0, f"took {said[0][0]:.1f} s to stop"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
