"""Records and the Qwen2.5-VL collator: every kind of bad record is reported with file, line and reason (or
skipped into a rejects file on request), and the collator's ids, labels, groups and masks equal a hand-rendered
sequence built piece by piece from the tokenizer."""

import json
import os

import pytest
import torch
from sft_fixtures import tiny_processor

from avar_ops.analysis import synthetic_images
from avar_ops.data.records import RecordError, load_records
from avar_train.data.collator import CollateError, QwenVLCollator

# ----------------------------------------------------------------------------------------------------- loader


@pytest.fixture
def data_dir(tmp_path):
    synthetic_images(1, seed=0, sizes=(56,))[0].save(tmp_path / "ok.png")
    (tmp_path / "not_an_image.png").write_text("plain text, not a PNG")
    (tmp_path / "outside.png").write_bytes((tmp_path / "ok.png").read_bytes())
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes((tmp_path / "ok.png").read_bytes())
    (data / "fake.png").write_bytes((tmp_path / "not_an_image.png").read_bytes())
    os.symlink(tmp_path / "outside.png", data / "link.png")
    return data


GOOD = {"id": "g", "image": "ok.png", "question": "What colour?", "response": "Red.", "answer": "red"}

BAD = [
    ("not json", "{not json", "not valid JSON"),
    ("not an object", "[1, 2]", "must be a JSON object"),
    ("unknown key", {**GOOD, "extra": 1}, "unknown keys ['extra']"),
    ("bad id", {**GOOD, "id": ""}, "'id' must be a non-empty string"),
    ("bool id", {**GOOD, "id": True}, "'id' must be a non-empty string"),
    ("image and images", {**GOOD, "images": ["ok.png"]}, "either 'image'"),
    (
        "images not a list",
        {**{k: v for k, v in GOOD.items() if k != "image"}, "images": "ok.png"},
        "'images' must be a list",
    ),
    ("absolute path", {**GOOD, "image": "/etc/passwd"}, "must be relative"),
    ("escaping path", {**GOOD, "image": "../outside.png"}, "leaves the data folder"),
    ("escaping symlink", {**GOOD, "image": "link.png"}, "leaves the data folder"),
    ("missing file", {**GOOD, "image": "nope.png"}, "image file not found"),
    ("not an image", {**GOOD, "image": "fake.png"}, "is not a readable image"),
    ("no question", {k: v for k, v in GOOD.items() if k != "question"}, "needs 'messages' or 'question'"),
    ("empty question", {**GOOD, "question": "  "}, "'question' must be a non-empty string"),
    ("empty response", {**GOOD, "response": ""}, "'response' must be a non-empty string"),
    ("empty system", {**GOOD, "system": ""}, "'system' must be a non-empty string"),
    ("question and messages", {**GOOD, "messages": [{"role": "user", "content": "hi"}]}, "not both"),
    (
        "empty turn",
        {"id": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        "empty turns",
    ),
    ("bad role", {"id": "m", "messages": [{"role": "tool", "content": "x"}]}, "role must be one of"),
    (
        "late system",
        {"id": "m", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
        "system turn may only come first",
    ),
    (
        "two system prompts",
        {"id": "m", "system": "s", "messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]},
        "not both",
    ),
    ("no user turn", {"id": "m", "messages": [{"role": "assistant", "content": "a"}]}, "no user turn"),
    ("turn keys", {"id": "m", "messages": [{"role": "user", "text": "a"}]}, "exactly 'role' and 'content'"),
    ("bad part", {"id": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "content[0] must be"),
    (
        "image part count",
        {
            "id": "m",
            "image": "ok.png",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
            ],
        },
        "2 image parts but the record has 1 images",
    ),
    ("no target for sft", {k: v for k, v in GOOD.items() if k != "response"}, "needs a target"),
    ("meta not an object", {**GOOD, "meta": [1]}, "'meta' must be an object"),
]


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


@pytest.mark.parametrize("name,line,reason", BAD, ids=[b[0] for b in BAD])
def test_loader_reports_each_bad_record(data_dir, name, line, reason):
    path = data_dir / "train.jsonl"
    _write(path, [GOOD, "", line])  # the bad record is on line 3 (line 2 is blank)
    with pytest.raises(RecordError) as info:
        load_records(str(path), use="sft")
    assert info.value.where == f"{path}:3"
    assert reason in info.value.reason, str(info.value)


def test_loader_duplicate_ids_and_rl_answers(data_dir):
    path = data_dir / "train.jsonl"
    _write(path, [GOOD, {**GOOD, "question": "Again?"}])
    with pytest.raises(RecordError, match=r":2: duplicate id 'g' \(first on line 1\)"):
        load_records(str(path))
    _write(path, [{k: v for k, v in GOOD.items() if k != "answer"}])
    with pytest.raises(RecordError, match="needs the reference 'answer'"):
        load_records(str(path), use="rl")
    assert load_records(str(path), use="sft").records[0].target == "Red."


def test_loader_skip_writes_rejects_and_counts(data_dir, caplog):
    path = data_dir / "train.jsonl"
    bad_lines = [b[1] for b in BAD]
    _write(path, [GOOD] + bad_lines + [{**GOOD, "id": "g2"}])
    rejects = data_dir / "out" / "rejects.jsonl"
    with pytest.raises(ValueError, match="needs rejects_path"):
        load_records(str(path), use="sft", on_error="skip")
    loaded = load_records(str(path), use="sft", on_error="skip", rejects_path=str(rejects))
    assert [r.id for r in loaded.records] == ["g", "g2"]
    assert loaded.rejected == len(BAD)
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(2, 2 + len(BAD)))
    for row, (_, _, reason) in zip(rows, BAD):
        assert reason in row["reason"] and row["file"] == str(path)
    assert f"skipped {len(BAD)} bad record(s)" in caplog.text
    _write(path, bad_lines[:2])
    with pytest.raises(RecordError, match=r"no valid records \(2 rejected\)"):
        load_records(str(path), on_error="skip", rejects_path=str(rejects))


def test_loader_normalises_messages(data_dir):
    path = data_dir / "train.jsonl"
    _write(
        path,
        [
            {
                "id": 7,
                "images": ["ok.png", "ok.png"],
                "system": "Be brief.",
                "messages": [
                    {"role": "user", "content": "Compare them."},
                    {"role": "assistant", "content": "Same."},
                    {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
                    {"role": "assistant", "content": "Yes."},
                ],
            }
        ],
    )
    (record,) = load_records(str(path), use="sft").records
    assert record.id == "7" and len(record.images) == 2
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [p["type"] for p in record.messages[1]["content"]] == ["image", "image", "text"]
    assert record.target == "Yes." and record.question == "Sure?"
    assert [m["role"] for m in record.prompt_messages] == ["system", "user", "assistant", "user"]


# --------------------------------------------------------------------------------------------------- collator


def _encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _hand_rendered(tok, pieces):
    """ids, groups, labels of a sequence given as (text, group, is_label) pieces, each encoded on its own."""
    ids, groups, labels = [], [], []
    for text, group, is_label in pieces:
        piece = _encode(tok, text)
        ids += piece
        groups += [group] * len(piece)
        labels += piece if is_label else [-100] * len(piece)
    return ids, groups, labels


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collate")
    synthetic_images(1, seed=0, sizes=(56,))[0].save(folder / "small.png")  # 4 visual tokens
    synthetic_images(1, seed=1, sizes=(112,))[0].save(folder / "large.png")  # 16 visual tokens at 112×112
    _write(
        folder / "d.jsonl",
        [
            {"id": "a", "image": "small.png", "system": "Be brief.", "question": "What colour?", "response": "Red."},
            {
                "id": "b",
                "image": "large.png",
                "question": "How many circles are there?",
                "response": "There are two circles in the picture.",
            },
        ],
    )
    return load_records(str(folder / "d.jsonl"), use="sft").records


def _collator(mode="sft", max_length=256, max_pixels=112 * 112):
    return QwenVLCollator(tiny_processor(), max_length=max_length, min_pixels=56 * 56, max_pixels=max_pixels, mode=mode)


def test_collator_matches_hand_rendered_spans(records):
    tok = tiny_processor().tokenizer
    batch = _collator()(records)
    expected = [
        _hand_rendered(
            tok,
            [
                ("<|im_start|>system\nBe brief.<|im_end|>", 2, False),
                ("\n<|im_start|>user\n<|vision_start|>", 0, False),
                ("<|image_pad|>" * 4, 1, False),
                ("<|vision_end|>", 0, False),
                ("What colour?", 3, False),
                ("<|im_end|>\n<|im_start|>assistant\n", 0, False),
                ("Red.<|im_end|>", 0, True),
                ("\n", 0, False),
            ],
        ),
        _hand_rendered(
            tok,
            [
                ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>", 2, False),
                ("\n<|im_start|>user\n<|vision_start|>", 0, False),
                ("<|image_pad|>" * 16, 1, False),
                ("<|vision_end|>", 0, False),
                ("How many circles are there?", 3, False),
                ("<|im_end|>\n<|im_start|>assistant\n", 0, False),
                ("There are two circles in the picture.<|im_end|>", 0, True),
                ("\n", 0, False),
            ],
        ),
    ]
    L = max(len(e[0]) for e in expected)
    assert batch["input_ids"].shape == (2, L)
    for b, (ids, groups, labels) in enumerate(expected):
        n, pad = len(ids), L - len(ids)  # right padding
        assert batch["input_ids"][b, :n].tolist() == ids
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * pad
        assert batch["key_group"][b].tolist() == groups + [-1] * pad
        assert batch["labels"][b].tolist() == labels + [-100] * pad
        kg = torch.tensor(groups + [-1] * pad)
        assert batch["user_mask"][b].tolist() == (kg == 3).tolist()
        assert batch["image_mask"][b].tolist() == (kg == 1).tolist()
        assert batch["system_mask"][b].tolist() == (kg == 2).tolist()
        assert batch["response_mask"][b].tolist() == (torch.tensor(labels + [-100] * pad) != -100).tolist()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert batch["pixel_values"].shape[0] == 16 + 64
    assert batch["record_ids"] == ["a", "b"]


def test_collator_pixel_budget_and_prompt_mode(records):
    small_budget = _collator(max_pixels=56 * 56)(records)
    assert small_budget["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert int(small_budget["image_mask"].sum()) == 8
    prompt = _collator(mode="prompt")(records)
    assert "labels" not in prompt
    tok = tiny_processor().tokenizer
    header = _encode(tok, "<|im_start|>assistant\n")
    for b in range(2):  # left padding: every prompt ends with the generation header
        assert prompt["input_ids"][b, -len(header) :].tolist() == header
        assert not prompt["response_mask"][b].any()
    assert prompt["attention_mask"][0, 0] == 0 and prompt["attention_mask"][:, -1].all()


def test_collator_budget_refuses_to_cut_images(records):
    full = _collator()(records[1:])
    n = int(full["attention_mask"].sum())
    last_image = int(torch.nonzero(full["image_mask"][0]).max())
    with pytest.raises(CollateError, match=r"record 'b': max_length=20 would cut through image tokens"):
        _collator(max_length=20)(records[1:])
    with pytest.raises(CollateError, match="no target token left"):
        _collator(max_length=last_image + 5)(records[1:])
    collator = _collator(max_length=n - 3)
    cut = collator(records[1:])
    assert cut["input_ids"].shape[1] == n - 3 and collator.truncated == 1
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : n - 3].tolist()
    assert cut["labels"][0].tolist() == full["labels"][0, : n - 3].tolist()


def test_collator_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        _collator(max_length=0)
    with pytest.raises(ValueError, match="min_pixels .* must not exceed max_pixels"):
        _collator(max_pixels=28 * 28)
    with pytest.raises(ValueError, match="mode must be one of"):
        _collator(mode="chat")
