"""One schema for samples and training records: a training file (question form or `messages` form) is also a
sample file for the `avar` commands, and both readers render the same conversation from it."""

from __future__ import annotations

import json
import os

import pytest
from sft_fixtures import write_sft_records

from avar_ops.data import chat_messages, load_records, load_samples


def _rewrite(path: str, change) -> str:
    rows = [change(json.loads(line)) for line in open(path, encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _as_messages(row: dict) -> dict:
    """The same record written as a conversation; odd-numbered ones keep `system` as a key."""
    row = dict(row)
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row.pop("question")}]}]
    turns.append({"role": "assistant", "content": row.pop("response")})
    if int(row["id"][1:]) % 2 == 0:
        turns.insert(0, {"role": "system", "content": row.pop("system")})
    row["messages"] = turns
    return row


@pytest.mark.parametrize("form", ["question", "messages"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_training_file_is_a_sample_file_with_the_same_conversation(form, seed, tmp_path):
    path = write_sft_records(str(tmp_path), n=4, seed=seed, system=f"System prompt {seed}.")
    _rewrite(path, lambda r: {**r, "answer": f"gold {r['id']}", "meta": {"source": "t"}})
    if form == "messages":
        _rewrite(path, _as_messages)
    records = load_records(path, use="sft").records
    samples = load_samples(path)
    assert [s["id"] for s in samples] == [r.id for r in records]
    for sample, record in zip(samples, records):
        assert [os.path.realpath(p) for p in sample["images"]] == list(record.images)
        assert chat_messages(sample, sample["response"]) == list(record.messages)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "one question"),
        ([{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image"}]}], "images come before"),
        ([{"role": "assistant", "content": "b"}], "no user turn"),
    ],
)  # fmt: skip
def test_a_conversation_that_is_not_one_question_is_refused_as_a_sample(messages, reason, tmp_path):
    path = write_sft_records(str(tmp_path), n=2)
    _rewrite(path, lambda r: {"id": r["id"], "image": r["image"], "messages": messages})
    with pytest.raises(ValueError, match=reason) as info:
        load_samples(path)
    assert str(info.value).startswith(f"{path}:1[0]: ")
