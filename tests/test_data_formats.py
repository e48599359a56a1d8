"""Data layouts users already have: LLaMA-Factory's ShareGPT (`conversations` from/value, `images`, `<image>`
where each image stands, and its role/content variant) and OpenAI chat `messages` with `image_url` parts. One
conversation written in each layout gives the same record as avar's own; `auto` recognises a file's layout and
refuses mixed or ambiguous files; every bad line is one error naming the file, the line and the field; ids are
optional (file name and line)."""

import json
import re

import pytest
from sft_fixtures import tiny_processor

from avar_ops.analysis import synthetic_images
from avar_ops.data import detect_format, file_format, load_samples, sample_from_record
from avar_ops.data.records import RecordError, load_records
from avar_train.data.collator import QwenVLCollator


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture
def folder(tmp_path):
    for i, img in enumerate(synthetic_images(2, seed=3, sizes=(56,))):
        img.save(tmp_path / f"im{i}.png")
    (tmp_path / "sub").mkdir()
    synthetic_images(1, seed=4, sizes=(56,))[0].save(tmp_path / "sub" / "deep.png")
    synthetic_images(1, seed=5, sizes=(56,))[0].save(tmp_path.parent / f"{tmp_path.name}_outside.png")
    return tmp_path


# The same two-turn conversation, an image in each user turn, the second in the middle of the text.
AVAR = {
    "id": "x",
    "images": ["im0.png", "im1.png"],
    "system": "Be brief.",
    "answer": "2",
    "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
        {"role": "assistant", "content": "Two."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And here "}, {"type": "image"}, {"type": "text", "text": " ?"}],
        },
        {"role": "assistant", "content": "<answer>2</answer>"},
    ],
}
SHAREGPT = {
    "id": "x",
    "images": ["im0.png", "im1.png"],
    "answer": "2",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>How many circles?"},
        {"from": "gpt", "value": "Two."},
        {"from": "human", "value": "And here <image> ?"},
        {"from": "gpt", "value": "<answer>2</answer>"},
    ],
}
SHAREGPT_MESSAGES = {
    "id": "x",
    "images": ["im0.png", "im1.png"],
    "system": "Be brief.",
    "answer": "2",
    "messages": [
        {"role": "user", "content": "<image>How many circles?"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "And here <image> ?"},
        {"role": "assistant", "content": "<answer>2</answer>"},
    ],
}


def _openai(second_url="im1.png"):
    return {
        "id": "x",
        "answer": "2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "im0.png"}},
                    {"type": "text", "text": "How many circles?"},
                ],
            },
            {"role": "assistant", "content": "Two."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And here "},
                    {"type": "image_url", "image_url": {"url": second_url, "detail": "auto"}},
                    {"type": "text", "text": " ?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>2</answer>"}]},
        ],
    }


def _load(folder, rows, fmt, **kw):
    return load_records(_write(folder / "d.jsonl", rows), format=fmt, **kw).records


@pytest.mark.parametrize(
    "row,fmt",
    [
        (SHAREGPT, "sharegpt"),
        (SHAREGPT_MESSAGES, "sharegpt"),
        (_openai(), "openai"),
        (SHAREGPT, "auto"),
        (_openai(), "auto"),
    ],
    ids=["sharegpt", "sharegpt-messages", "openai", "auto-sharegpt", "auto-openai"],
)
def test_each_layout_gives_the_avar_record(folder, row, fmt):
    (want,) = _load(folder, [AVAR], "avar", use="sft")
    (got,) = _load(folder, [row], fmt, use="sft")
    assert got == want
    # Where the images stand: first turn before its text, second between "And here " and " ?".
    assert [p["type"] for p in got.messages[1]["content"]] == ["image", "text"]
    assert [p["type"] for p in got.messages[3]["content"]] == ["text", "image", "text"]
    assert got.images == (str(folder / "im0.png"), str(folder / "im1.png"))


def test_file_urls_and_absolute_paths_inside_the_folder(folder):
    deep = folder / "sub" / "deep.png"
    for url in (deep.as_uri(), str(deep), "sub/deep.png", f"file://localhost{deep}"):
        (got,) = _load(folder, [_openai(url)], "openai", use="rl")
        assert got.images[1] == str(deep), url
    (got,) = _load(folder, [{**SHAREGPT, "images": [str(folder / "im0.png"), "im1.png"]}], "sharegpt")
    assert got.images[0] == str(folder / "im0.png")


def test_ids_are_optional_and_derived_from_file_and_line(folder):
    rows = [{k: v for k, v in SHAREGPT.items() if k != "id"}, "", {**SHAREGPT, "id": "own"}]
    records = _load(folder, rows, "sharegpt")
    assert [r.id for r in records] == ["d.jsonl:1", "own"]
    rows = [{k: v for k, v in AVAR.items() if k != "id"}, {**AVAR, "id": "d.jsonl:1"}]
    with pytest.raises(RecordError, match=r"d.jsonl:2: duplicate id 'd.jsonl:1' \(first on line 1\)"):
        _load(folder, rows, "avar")


def test_auto_per_file(folder):
    plain = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    assert file_format([(1, plain)]) == "avar"  # every layout reads it alike
    assert file_format([(1, plain), (2, _openai())]) == "openai"
    assert file_format([(1, plain), (2, SHAREGPT)]) == "sharegpt"
    assert file_format([(1, {"question": "q?"}), (2, plain)]) == "avar"
    assert detect_format(SHAREGPT_MESSAGES) == (frozenset({"avar", "sharegpt"}), True)
    assert detect_format(AVAR) == (frozenset({"avar"}), False)
    with pytest.raises(RecordError, match=r"d.jsonl: mixed layouts: line 1 reads as sharegpt, line 3 as openai"):
        _load(folder, [SHAREGPT, plain, _openai()], "auto")
    with pytest.raises(RecordError, match=r"d.jsonl: line 2: ambiguous layout: .*set data_format"):
        _load(folder, [plain, SHAREGPT_MESSAGES], "auto")
    # Told the layout, the same file reads.
    assert len(_load(folder, [plain, SHAREGPT_MESSAGES], "sharegpt")) == 2
    with pytest.raises(ValueError, match="format must be one of"):
        _load(folder, [plain], "llava")


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


SG_BAD = [
    (
        "more images",
        {"images": ["im0.png", "im1.png"], "conversations": _turns(("human", "<image>Q?"), ("gpt", "A"))},
        "1 <image> placeholder\\(s\\) but 'images' lists 2",
    ),
    (
        "more placeholders",
        {"images": ["im0.png"], "conversations": _turns(("human", "<image><image>Q?"), ("gpt", "A"))},
        "2 <image> placeholder\\(s\\) but 'images' lists 1",
    ),
    (
        "placeholder without images",
        {"conversations": _turns(("human", "<image>Q?"), ("gpt", "A"))},
        "1 <image> placeholder\\(s\\) but 'images' lists 0",
    ),
    (
        "placeholder in gpt",
        {"images": ["im0.png"], "conversations": _turns(("human", "Q?"), ("gpt", "<image>A"))},
        r"conversations\[1\]: <image> placeholders belong in user \(human\) turns",
    ),
    (
        "tool turn",
        {"conversations": _turns(("human", "Q?"), ("function_call", "{}"))},
        r"conversations\[1\].from is 'function_call': tool turns are not supported",
    ),
    ("unknown role", {"conversations": _turns(("person", "Q?"))}, r"conversations\[0\].from must be one of"),
    ("not alternating", {"conversations": _turns(("human", "Q?"), ("human", "Q2?"))}, "must alternate"),
    ("gpt first", {"conversations": _turns(("gpt", "A"), ("human", "Q?"))}, "must alternate"),
    ("late system", {"conversations": _turns(("human", "Q?"), ("system", "S"))}, "system turn may only come first"),
    (
        "extra turn key",
        {"conversations": [{"from": "human", "value": "Q?", "weight": 1}]},
        "exactly 'from' and 'value'",
    ),
    (
        "value not text",
        {"conversations": [{"from": "human", "value": 3}]},
        r"conversations\[0\].value must be a string",
    ),
    ("image only", {"images": ["im0.png"], "conversations": _turns(("human", "<image>"), ("gpt", "A"))}, "has no text"),
    ("tools", {"tools": "[]", "conversations": _turns(("human", "Q?"))}, "'tools' is not supported"),
    ("unknown key", {"source": "x", "conversations": _turns(("human", "Q?"))}, r"unknown keys \['source'\]"),
    ("both lists", {"conversations": _turns(("human", "Q?")), "messages": []}, "exactly one of"),
    ("empty list", {"conversations": []}, "non-empty list"),
    (
        "marker in text",
        {"conversations": _turns(("human", "Q?<|im_end|>"))},
        r"conversations\[0\]: 'value' contains '<\|im_end\|>'",
    ),
    (
        "web image",
        {"images": ["https://x.org/a.png"], "conversations": _turns(("human", "<image>Q?"))},
        r"images\[0\] is a web address .* nothing is downloaded",
    ),
    (
        "outside path",
        {"images": ["/etc/hostname"], "conversations": _turns(("human", "<image>Q?"))},
        "outside the data folder",
    ),
    (
        "escaping path",
        {"images": ["../x.png"], "conversations": _turns(("human", "<image>Q?"))},
        "leaves the data folder",
    ),
    (
        "missing image",
        {"images": ["nope.png"], "conversations": _turns(("human", "<image>Q?"))},
        "image file not found",
    ),
]


@pytest.mark.parametrize("name,row,reason", SG_BAD, ids=[b[0] for b in SG_BAD])
def test_sharegpt_bad_lines(folder, name, row, reason):
    with pytest.raises(RecordError) as info:
        _load(folder, [SHAREGPT, row], "sharegpt")
    message = str(info.value)
    assert message.startswith(f"{folder / 'd.jsonl'}:2: ") and "\n" not in message
    assert re.search(reason, message), message


def _user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}]}


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


OA_BAD = [
    (
        "http",
        _user(_img("http://x.org/a.png"), {"type": "text", "text": "Q?"}),
        r"messages\[0\].content\[0\].image_url.url is a web address .* nothing is downloaded",
    ),
    (
        "data url",
        _user(_img("data:image/png;base64,iVBORw0KGgo="), {"type": "text", "text": "Q?"}),
        "is a data: URL; images are read from files",
    ),
    ("other host", _user(_img("file://server/share/a.png"), {"type": "text", "text": "Q?"}), "names another host"),
    ("ftp", _user(_img("ftp://x.org/a.png"), {"type": "text", "text": "Q?"}), "is a URL; give a local path"),
    (
        "outside file url",
        _user(_img("file:///etc/hostname"), {"type": "text", "text": "Q?"}),
        "outside the data folder",
    ),
    (
        "image in assistant",
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": [_img("im0.png")]}]},
        "images belong in user turns",
    ),
    ("unknown part", _user({"type": "input_audio", "input_audio": {}}), r"content\[0\] must be"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "tool turns are not supported"),
    ("name key", {"messages": [{"role": "user", "content": "Q?", "name": "bob"}]}, "exactly 'role' and 'content'"),
    (
        "unknown key",
        {"messages": [{"role": "user", "content": "Q?"}], "images": ["im0.png"]},
        r"unknown keys \['images'\]",
    ),
    ("marker", _user({"type": "text", "text": "<|image_pad|>"}), r"messages\[0\].content\[0\]: 'text' contains"),
    ("no user", {"messages": [{"role": "system", "content": "S"}]}, "no user turn"),
]


@pytest.mark.parametrize("name,row,reason", OA_BAD, ids=[b[0] for b in OA_BAD])
def test_openai_bad_lines(folder, name, row, reason):
    with pytest.raises(RecordError) as info:
        _load(folder, [_openai(), row], "openai")
    message = str(info.value)
    assert message.startswith(f"{folder / 'd.jsonl'}:2: ") and "\n" not in message
    assert re.search(reason, message), message


def test_skip_bad_lines_into_rejects(folder):
    bad = {"images": ["im0.png"], "conversations": _turns(("human", "Q?"), ("gpt", "A"))}
    rejects = folder / "out" / "rejects.jsonl"
    loaded = load_records(
        _write(folder / "d.jsonl", [SHAREGPT, bad]), format="auto", on_error="skip", rejects_path=str(rejects)
    )
    assert [r.id for r in loaded.records] == ["x"] and loaded.rejected == 1
    (row,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert row["line"] == 2 and "placeholder" in row["reason"]


def test_collator_renders_images_where_they_stand(folder):
    """The ShareGPT record's second image lands between "And here" and "?" in the rendered prompt."""
    (record,) = _load(folder, [SHAREGPT], "sharegpt", use="sft")
    collator = QwenVLCollator(tiny_processor(), max_length=512, min_pixels=56 * 56, max_pixels=56 * 56, mode="sft")
    text = collator.render(record)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert "<|im_start|>user\n" + vision + "How many circles?<|im_end|>" in text
    assert "<|im_start|>user\nAnd here " + vision + " ?<|im_end|>" in text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    batch = collator([record])
    assert int(batch["image_mask"].sum()) == 2 * 4  # two 56×56 images, 4 visual tokens each


def test_samples_for_vas_from_every_layout(folder):
    one_turn = {
        "images": ["im0.png"],
        "conversations": _turns(("system", "S."), ("human", "<image>\nHow many?"), ("gpt", "2")),
    }
    path = _write(folder / "s.jsonl", [one_turn])
    (sample,) = load_samples(path, format="auto")
    assert sample == {
        "id": "s.jsonl:1",
        "images": [str(folder / "im0.png")],
        "question": "\nHow many?",
        "system": "S.",
        "response": "2",
    }
    # avar samples keep their own reading (ids default to the index).
    path = _write(folder / "a.jsonl", [{"image": "im0.png", "question": "How many?"}])
    assert load_samples(path, format="auto")[0]["id"] == "0"
    # A sample is one user turn with its images in front: anything else would be measured on another prompt.
    (multi,) = _load(folder, [SHAREGPT], "sharegpt")
    with pytest.raises(ValueError, match="a sample is one user turn"):
        sample_from_record(multi)
    late = {"images": ["im0.png"], "conversations": _turns(("human", "Look: <image>"))}
    with pytest.raises(ValueError, match="an image stands after text"):
        load_samples(_write(folder / "l.jsonl", [late]), format="sharegpt")


def test_avar_vas_data_flag_reads_layouts_in_one_line_errors(folder):
    from avar_ops.cli.args import load_data
    from avar_ops.cli.errors import DataError

    one_turn = {"images": ["im0.png"], "conversations": _turns(("human", "<image>How many?"))}
    path = _write(folder / "v.jsonl", [one_turn])
    assert load_data(path, None, "auto")[0]["question"] == "How many?"
    mixed = _write(folder / "m.jsonl", [one_turn, _openai()])
    with pytest.raises(DataError, match=r"^--data: .*m.jsonl: mixed layouts: line 1 reads as sharegpt") as info:
        load_data(mixed, None, "auto")
    assert "\n" not in str(info.value)
