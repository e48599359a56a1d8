"""`avar eval`'s checks before the model loads: prompts against the model's context length, --seed and the pixel
budgets, and a judge server that does not answer; each is one line on stderr, with no model loaded."""

import os
import socket

import eval_fixtures
import pytest

import avar_ops.cli as cli

ARGS = ["--max-new-tokens", "4", "--no-progress", "--checker-timeout", "3"]


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded for a bad command")


def _mmstar(root, question):
    row = dict(
        index=0,
        question=question,
        image=eval_fixtures.png(),
        answer="A",
        category="coarse perception",
        l2_category="image scene",
        meta_info=None,
    )
    eval_fixtures.write(os.path.join(root, "mmstar.parquet"), [row])
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _mmstar(str(tmp_path_factory.mktemp("small")), "What color?\nOptions: A: red, B: green")


def _eval(capsys, monkeypatch, *argv):
    monkeypatch.setattr(cli.loading, "load_model", _no_model)
    code = cli.main(["eval", "--model", "tiny", *argv, *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("chars", [10_000_000, 300_000])
def test_a_question_beyond_the_context_is_one_line(chars, tmp_path, capsys, monkeypatch):
    # 10 MB is refused by its length in characters, 300k characters (~tens of thousands of tokens, over the
    # tiny model's 4096) by its length in tokens.
    words = "how many red dots are there " * (chars // 28 + 1)
    bench = _mmstar(str(tmp_path / "long"), words[:chars] + "\nOptions: A: 1, B: 2")
    code, err = _eval(capsys, monkeypatch, "--bench", "mmstar=" + bench, "--out", str(tmp_path / "o"))
    assert code == 1 and len(err) == 1 and err[0].startswith("avar eval: error:"), err
    assert ("characters long" in err[0]) if chars > 1_000_000 else ("context holds 4096" in err[0]), err


def test_max_new_tokens_count_against_the_context(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.loading, "load_model", _no_model)
    argv = ["eval", "--model", "tiny", "--bench", "mmstar=" + small, "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main([*argv, "--max-new-tokens", "4090"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-new-tokens is 4090" in err[0], err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", str(2**64)], "--seed: expected an integer in [0, 2**64 - 1]"),
        (["--seed", "-1"], "--seed"),
        (["--min-pixels", "20000", "--max-pixels", "10000"], "--min-pixels (20000) must not exceed --max-pixels"),
    ],
)
def test_seed_and_pixel_budgets(flags, message, small, tmp_path, capsys, monkeypatch):
    code, err = _eval(capsys, monkeypatch, "--bench", "mmstar=" + small, "--out", str(tmp_path / "o"), *flags)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_judge_server_down_is_one_line(small, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = "http://127.0.0.1:%d/v1" % port
    code, err = _eval(
        capsys,
        monkeypatch,
        "--bench",
        "mmstar=" + small,
        "--out",
        str(tmp_path / "o"),
        "--judge-url",
        url,
        "--judge-model",
        "judge",
    )
    assert code == 2 and len(err) == 1 and "--judge-url" in err[0] and "does not answer" in err[0], err
