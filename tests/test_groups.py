"""Token groups against spans found by rendering Qwen2.5-VL's chat format by hand.

Each case writes the prompt as a list of (text, group, in_response) segments, joins them into the text the
template renders, tokenizes it with character offsets and gives every token the group of the segment its
characters come from. That expectation knows nothing of how `token_groups` finds turns.
"""

import pytest
import torch

from avar_ops.hf import token_groups
from avar_ops.analysis.tiny_qwen import build_tiny_processor, synthetic_images

SYS, USER, OTHER, VIS = 2, 3, 0, 1


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def system(text):
    return [("<|im_start|>system\n", SYS, False), (text, SYS, False), ("<|im_end|>", SYS, False), ("\n", OTHER, False)]


def user(*parts):
    segs = [("<|im_start|>user\n", OTHER, False)]
    for p in parts:
        if isinstance(p, int):  # an image of p visual tokens
            segs += [("<|vision_start|>", OTHER, False), ("<|image_pad|>" * p, VIS, False),
                     ("<|vision_end|>", OTHER, False)]
        elif p == "video":
            segs += [("<|vision_start|>", OTHER, False), ("<|video_pad|>" * 6, VIS, False),
                     ("<|vision_end|>", OTHER, False)]
        else:
            segs.append((p, USER, False))
    return segs + [("<|im_end|>", OTHER, False), ("\n", OTHER, False)]


def assistant(text, closed=True):
    segs = [("<|im_start|>assistant\n", OTHER, False), (text, OTHER, True)]
    return segs + ([("<|im_end|>", OTHER, True), ("\n", OTHER, False)] if closed else [])


GEN_PROMPT = [("<|im_start|>assistant\n", OTHER, False)]

CASES = {
    "system_image_user": system("Look at the image first.") + user(4, "What colour is the square?") + GEN_PROMPT,
    "default_system": system("You are a helpful assistant.") + user(9, "Describe the image.") + GEN_PROMPT,
    "no_system": user(4, "How many circles are there?") + GEN_PROMPT,
    "several_images_and_video": system("Compare.") + user("Picture 1: ", 4, "Picture 2: ", 16, "video", "Which?")
    + GEN_PROMPT,
    "multi_turn": system("Be careful.") + user(9, "What is shown?") + assistant("A red square.")
    + user("Are you sure? Look back at the image.") + assistant("Wait, let me check", closed=False),
    # Role names inside content must not start turns; only the token after <|im_start|> names a role.
    "role_words_in_content": system("The user asks, the assistant answers.") + user("system user assistant")
    + assistant("user system"),
    "text_before_any_turn": [("Picture 1: ", OTHER, False)] + user(4, "yes") + GEN_PROMPT,
}


def expected(processor, segments):
    """input_ids [L], key groups [L] and response mask [L] of the hand-rendered segments."""
    text = "".join(s for s, _, _ in segments)
    enc = processor.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    bounds, pos = [], 0
    for s, g, r in segments:
        bounds.append((pos, pos + len(s), g, r))
        pos += len(s)
    groups, resp = [], []
    for start, end in enc["offset_mapping"]:
        seg = [b for b in bounds if b[0] <= start < b[1]]
        assert len(seg) == 1 and end <= seg[0][1], f"token {text[start:end]!r} crosses a segment boundary"
        groups.append(seg[0][2])
        resp.append(seg[0][3])
    return torch.tensor(enc["input_ids"]), torch.tensor(groups, dtype=torch.int8), torch.tensor(resp)


def check_masks(tg, valid):
    kg = tg.key_group
    assert torch.equal(tg.image_mask, kg == VIS)
    assert torch.equal(tg.system_mask, kg == SYS)
    assert torch.equal(tg.user_mask, kg == USER)
    assert torch.equal(kg == -1, ~valid)
    assert not (tg.response_mask & ~valid).any()


@pytest.mark.parametrize("name", sorted(CASES))
def test_groups_match_hand_rendering(processor, name):
    ids, groups, resp = expected(processor, CASES[name])
    tg = token_groups(ids[None], processor)
    assert torch.equal(tg.key_group[0], groups), name
    assert torch.equal(tg.response_mask[0], resp), name
    check_masks(tg, torch.ones_like(tg.user_mask))


def test_hand_rendering_is_the_template(processor):
    """The hand-written segments are what the processor renders and tokenizes (images expanded)."""
    images = synthetic_images(2, seed=3, sizes=(56, 112))
    msgs = [
        {"role": "system", "content": "Look at the image first."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"},
                                     {"type": "image"}]},
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=images, return_tensors="pt")
    n = (enc["image_grid_thw"].prod(-1) // 4).tolist()
    ids, groups, _ = expected(processor, system("Look at the image first.") + user(n[0], "What colour?", n[1])
                              + GEN_PROMPT)
    assert torch.equal(enc["input_ids"][0], ids)
    assert torch.equal(token_groups(enc["input_ids"], processor, enc["attention_mask"]).key_group[0], groups)
    # Without a system message the template renders Qwen's default system turn.
    default = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                            tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(processor, side):
    """A padded batch of every case gives each row's unpadded groups, and -1 on padding."""
    rows = [expected(processor, CASES[name]) for name in sorted(CASES)]
    L = max(len(r[0]) for r in rows)
    pad_id = processor.tokenizer.pad_token_id
    ids = torch.full((len(rows), L), pad_id)  # [B, L]
    mask = torch.zeros(len(rows), L, dtype=torch.long)  # [B, L]
    want = torch.full((len(rows), L), -1, dtype=torch.int8)  # [B, L]
    want_resp = torch.zeros(len(rows), L, dtype=torch.bool)  # [B, L]
    for b, (i, g, r) in enumerate(rows):
        sl = slice(L - len(i), L) if side == "left" else slice(0, len(i))
        ids[b, sl], mask[b, sl], want[b, sl], want_resp[b, sl] = i, 1, g, r
    tg = token_groups(ids, processor, mask)
    assert torch.equal(tg.key_group, want)
    assert torch.equal(tg.response_mask, want_resp)
    check_masks(tg, mask.bool())


def test_padding_token_ids_do_not_count(processor):
    """Padding positions are -1 whatever id they hold, even a template token."""
    ids, groups, _ = expected(processor, CASES["no_system"])
    im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    padded = torch.cat([ids, torch.tensor([im_start, im_start])])[None]  # [1, L + 2]
    mask = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(2, dtype=torch.long)])[None]
    tg = token_groups(padded, processor, mask)
    assert torch.equal(tg.key_group[0, : len(ids)], groups)
    assert (tg.key_group[0, len(ids):] == -1).all()


def test_bad_input(processor):
    ids, _, _ = expected(processor, CASES["no_system"])
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, L\] tensor"):
        token_groups(ids, processor)
    with pytest.raises(TypeError, match="integer tensor"):
        token_groups(ids[None].float(), processor)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        token_groups(ids[None], processor, torch.ones(1, 3))
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        token_groups(ids[None], object())
