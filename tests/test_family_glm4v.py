"""What is specific to GLM-4.1V / GLM-4.5V: the tiny processors reproduce GLM's chat layout (no token closing a
turn, think blocks, image and video markers, the generation prompts), its tokenizer (special tokens in the
checkpoints' order, GLM-4's split pattern) and its video expansion (frames as image blocks with timestamps).

The expected strings are written out by hand from the published templates' behaviour (GLM-4.1V-9B-Thinking and
GLM-4.5V, rendered by transformers with trim_blocks / lstrip_blocks), not from the tiny templates.
"""

import numpy as np
import pytest
import torch

from avar_ops.analysis import synthetic_images
from avar_ops.analysis.tiny_families import glm4v

SYSTEM = {"role": "system", "content": "Be brief."}
USER_IMAGE = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}
ANSWER = {"role": "assistant", "content": "<think>it is red</think><answer>red</answer>"}
USER_TEXT = {"role": "user", "content": "Are you sure?"}


@pytest.fixture(scope="module")
def tiny41():
    return glm4v.build(0, num_layers=2)


@pytest.fixture(scope="module")
def tiny45():
    return glm4v.build_moe(0, num_layers=2)


def _render(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, tokenize=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Chat layout


def test_glm41v_layout_has_no_closing_token(tiny41):
    """GLM-4.1V: [gMASK]<sop>, role token + newline, content, and nothing closing a turn: the next role token
    follows the content directly; the generation prompt is `<|assistant|>\\n`; a conversation rendered without
    it ends with the last content."""
    _, proc = tiny41
    head = "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>What colour?"
    assert _render(proc, [SYSTEM, USER_IMAGE], add_generation_prompt=True) == head + "<|assistant|>\n"
    full = head + "<|assistant|>\n<think>it is red</think><answer>red</answer>"
    assert _render(proc, [SYSTEM, USER_IMAGE, ANSWER]) == full
    assert _render(proc, [SYSTEM, USER_IMAGE, ANSWER, USER_TEXT], add_generation_prompt=True) == (
        full + "<|user|>\nAre you sure?<|assistant|>\n"
    )
    # No default system turn: a conversation without one starts with the user turn.
    assert _render(proc, [USER_TEXT]) == "[gMASK]<sop><|user|>\nAre you sure?"


def test_glm41v_layout_video_and_interleaved_parts(tiny41):
    _, proc = tiny41
    user = {
        "role": "user",
        "content": [
            {"type": "text", "text": "First "},
            {"type": "video"},
            {"type": "text", "text": " then "},
            {"type": "image"},
        ],
    }
    assert _render(proc, [user]) == (
        "[gMASK]<sop><|user|>\nFirst <|begin_of_video|><|video|><|end_of_video|> then "
        "<|begin_of_image|><|image|><|end_of_image|>"
    )


def test_glm45v_layout_think_blocks(tiny45):
    """GLM-4.5V: an assistant turn is `<|assistant|>` + `\\n<think>REASONING</think>` + `\\n` + the stripped
    answer; reasoning is kept only after the last user turn (earlier turns get an empty think block); the
    generation prompt is `<|assistant|>` alone, or with an empty think block when thinking is off (and the user
    turns then end in /nothink)."""
    _, proc = tiny45
    head = "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>What colour?"
    assert _render(proc, [SYSTEM, USER_IMAGE, ANSWER]) == (
        head + "<|assistant|>\n<think>it is red</think>\n<answer>red</answer>"
    )
    assert _render(proc, [SYSTEM, USER_IMAGE, ANSWER, USER_TEXT], add_generation_prompt=True) == (
        head + "<|assistant|>\n<think></think>\n<answer>red</answer><|user|>\nAre you sure?<|assistant|>"
    )
    reasoning = {"role": "assistant", "content": " red ", "reasoning_content": "look at it"}
    assert _render(proc, [USER_TEXT, reasoning]) == (
        "[gMASK]<sop><|user|>\nAre you sure?<|assistant|>\n<think>look at it</think>\nred"
    )
    assert _render(proc, [USER_TEXT], add_generation_prompt=True, enable_thinking=False) == (
        "[gMASK]<sop><|user|>\nAre you sure?/nothink<|assistant|>\n<think></think>"
    )


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_special_tokens_in_checkpoint_order(tiny41):
    """GLM's special tokens are consecutive, in the checkpoints' order (<|endoftext|> first, <|image|> and
    <|video|> last: 151329 … 151344 in GLM-4.1V), each one token; the model config carries their ids."""
    model, proc = tiny41
    tok = proc.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in glm4v.SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert set(ids) <= set(tok.all_special_ids)
    for t in glm4v.EXTRA_TOKENS:  # one token each, kept when decoding without special tokens
        (one,) = tok.encode(t, add_special_tokens=False)
        assert one not in tok.all_special_ids and tok.decode([one], skip_special_tokens=True) == t
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    cfg = model.config
    assert (cfg.image_token_id, cfg.video_token_id) == (ids[-2], ids[-1])
    assert cfg.image_start_token_id == tok.convert_tokens_to_ids("<|begin_of_image|>")
    assert cfg.video_end_token_id == tok.convert_tokens_to_ids("<|end_of_video|>")
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(t) for t in glm4v.EOS_TOKENS]


def test_glm_split_pattern(tiny41):
    """GLM-4's pre-tokenizer: digits in runs of up to three, a letter run takes one leading non-letter, newlines
    split off. Qwen's pattern (one digit per piece) would give other pieces."""
    _, proc = tiny41
    pre = proc.tokenizer.backend_tokenizer.pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str("1234567 x\n\nab")]
    assert pieces == ["123", "456", "7", "Ġx", "ĊĊ", "ab"]


# ---------------------------------------------------------------------------------------------------------------
# Processor


def test_image_budget(tiny41):
    """The small budgets: a 56×56 image is 4 visual tokens, a 112×112 one 16, whatever the aspect in between."""
    _, proc = tiny41
    text = _render(proc, [USER_IMAGE], add_generation_prompt=True)
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image|>")
    for side, n in ((56, 4), (112, 16)):
        (img,) = synthetic_images(1, seed=side, sizes=(side,))
        out = proc(text=[text], images=[img], return_tensors="pt")
        assert int((out["input_ids"] == image_id).sum()) == n


def test_video_frames_are_image_blocks_with_timestamps(tiny41):
    """GLM's processor turns `<|video|>` into one `<|begin_of_image|>` + `<|image|>`×n + `<|end_of_image|>` block
    per two frames, each followed by its timestamp in text, inside the video markers; `<|video|>` itself is gone
    and mm_token_type_ids marks the frames' tokens 2."""
    from transformers.video_utils import VideoMetadata

    model, proc = tiny41
    tok = proc.tokenizer
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}
    text = _render(proc, [user], add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    meta = VideoMetadata(total_num_frames=4, fps=2, duration=2.0, frames_indices=[0, 1, 2, 3])
    out = proc(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    toks = tok.convert_ids_to_tokens(out["input_ids"][0])
    block = ["<|begin_of_image|>"] + ["<|image|>"] * 6 + ["<|end_of_image|>"]
    start = toks.index("<|begin_of_video|>")
    assert toks[start : start + 20] == ["<|begin_of_video|>"] + block + ["0"] + block + ["1", "<|end_of_video|>"]
    assert "<|video|>" not in toks
    types = out["mm_token_type_ids"][0]
    assert torch.equal(types == 2, out["input_ids"][0] == model.config.image_token_id)
    with torch.no_grad():
        logits = model(**out).logits
    assert torch.isfinite(logits).all()


def test_build_is_reproducible_from_seed():
    a, _ = glm4v.build(3, num_layers=1)
    b, _ = glm4v.build(3, num_layers=1)
    c, _ = glm4v.build(4, num_layers=1)
    wa, wb, wc = (m.model.language_model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_build_refuses_bad_shapes():
    with pytest.raises(ValueError, match="num_kv_heads"):
        glm4v.build(0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim = 12"):
        glm4v.build(0, hidden_size=48, num_heads=4)
    with pytest.raises(ValueError, match="experts_per_token"):
        glm4v.build_moe(0, num_experts=2, experts_per_token=3)


# ---------------------------------------------------------------------------------------------------------------
# Groups and the response rule (a template with no closing token)


def _hand_groups(processor, ids, assistant_newline: bool):
    """A second reading of GLM's layout, written without the learned template: one loop over the tokens.

    A turn starts at a role token and runs to the next one; its header is the role token and the "\\n" after it
    (GLM-4.5V's assistant header is `<|assistant|>` alone: `assistant_newline=False`). Returns (key groups,
    response mask) as lists: visual 1 wherever; the whole system turn 2; a user turn's content without special
    tokens 3; the response is an assistant turn's content plus the role token that ends it.
    """
    tok = processor.tokenizer
    roles = {tok.convert_tokens_to_ids(f"<|{r}|>"): r for r in ("system", "user", "assistant", "observation")}
    image = tok.convert_tokens_to_ids("<|image|>")
    special = set(tok.all_special_ids)
    newline = tok.convert_tokens_to_ids("Ċ")
    groups, response = [0] * len(ids), [False] * len(ids)
    role, header_end = None, -1
    for i, t in enumerate(ids):
        if t in roles:
            if role == "assistant":
                response[i] = True  # what the model writes to end its turn
            role = roles[t]
            with_newline = role != "assistant" or assistant_newline
            header_end = i + 1 if with_newline and i + 1 < len(ids) and ids[i + 1] == newline else i
        if t == image:
            groups[i] = 1
        elif role == "system":
            groups[i] = 2
        elif role == "user" and i > header_end and t not in special:
            groups[i] = 3
        if role == "assistant" and i > header_end:
            response[i] = True
    return groups, response


CONVERSATIONS = [
    [SYSTEM, USER_IMAGE, ANSWER, USER_TEXT],
    [USER_IMAGE, ANSWER, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}],
    [USER_TEXT, {"role": "assistant", "content": "<answer>yes</answer>"}],
]


@pytest.mark.parametrize("which", ["4.1V", "4.5V"])
@pytest.mark.parametrize("prompt", [True, False])
def test_groups_match_a_hand_reading(tiny41, tiny45, which, prompt):
    """System / user / visual groups and the response mask equal the loop's reading on multi-turn conversations
    with images and think blocks, rendered with and without the generation prompt."""
    from avar_ops.hf import token_groups

    _, proc = tiny41 if which == "4.1V" else tiny45
    for k, messages in enumerate(CONVERSATIONS):
        text = _render(proc, messages, add_generation_prompt=prompt)
        n_images = sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if "image" in p)
        kwargs = {"images": synthetic_images(n_images, seed=k)} if n_images else {}
        ids = proc(text=[text], return_tensors="pt", **kwargs)["input_ids"]  # [1, L]
        tg = token_groups(ids, proc)
        groups, response = _hand_groups(proc, ids[0].tolist(), assistant_newline=which == "4.1V")
        assert tg.key_group[0].tolist() == groups, (which, k, text)
        assert tg.response_mask[0].tolist() == response, (which, k, text)
        assert tg.user_mask[0].tolist() == [g == 3 for g in groups]


def test_response_ends_with_the_next_opener(tiny41, tiny45):
    """No closing token: the response of an answered turn is its content and the `<|user|>` that follows it
    (GLM stops generating on `<|user|>`), never the next user's text; GLM-4.5V's response starts with the
    "\\n<think>" the model writes after its `<|assistant|>` prompt."""
    from avar_ops.hf import token_groups

    for (_, proc), first in ((tiny41, "<think>"), (tiny45, "Ċ")):
        tok = proc.tokenizer
        text = _render(proc, [USER_TEXT, ANSWER, USER_TEXT])
        ids = proc(text=[text], return_tensors="pt")["input_ids"]
        tg = token_groups(ids, proc)
        response = tok.convert_ids_to_tokens(ids[0][tg.response_mask[0]])
        assert response[0] == first and response[-1] == "<|user|>", response
        assert response.count("<|user|>") == 1 and "<|assistant|>" not in response
        assert tok.decode(ids[0][tg.response_mask[0]][:-1]).strip().endswith("<answer>red</answer>")


def test_generated_tokens_are_response_up_to_the_stop_token(tiny41, tiny45):
    """After the generation prompt, whatever the model writes is response, up to and including the EOS id it
    stops on (each of GLM's three); a think block with reasoning included."""
    from avar_ops.hf import token_groups

    for _, proc in (tiny41, tiny45):
        tok = proc.tokenizer
        prompt = proc(text=[_render(proc, [SYSTEM, USER_TEXT], add_generation_prompt=True)], return_tensors="pt")
        written = tok("\n<think>the square is red</think>\n<answer>red</answer>", add_special_tokens=False)
        for stop in glm4v.EOS_TOKENS:
            new = torch.tensor([written["input_ids"] + [tok.convert_tokens_to_ids(stop)]])
            ids = torch.cat([prompt["input_ids"], new], dim=1)  # [1, L0 + n]
            tg = token_groups(ids, proc)
            n0 = prompt["input_ids"].shape[1]
            assert tg.response_mask[0, n0:].all(), stop
            assert not tg.response_mask[0, :n0].any(), stop
            assert (tg.key_group[0, n0:] == 0).all(), stop


def test_sft_labels_end_with_the_stop_token(tiny41, tiny45):
    """The SFT collator appends `turn_end` (GLM: `<|user|>`, one of its EOS ids, as GLM's own fine-tuning does)
    after the final answer, and the labels are exactly every answer plus the `<|user|>` ending it: without it
    the model would never be taught to stop."""
    from avar_ops.data.records import Record
    from avar_ops.hf import template_tokens
    from avar_train.data.collator import QwenVLCollator

    for model, proc in (tiny41, tiny45):
        tok = proc.tokenizer
        user_id = tok.convert_tokens_to_ids("<|user|>")
        assert template_tokens(proc).closer is None and template_tokens(proc).turn_end == user_id
        assert user_id in model.generation_config.eos_token_id
        messages = (
            {"role": "user", "content": [{"type": "text", "text": "Is it red?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<think>look</think>sure"}]},
        )
        record = Record(id="r0", images=(), messages=messages, answer=None, meta=None)
        collator = QwenVLCollator(proc, max_length=256, min_pixels=56 * 56, max_pixels=112 * 112, mode="sft")
        batch = collator([record])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert ids[-1] == user_id and labels[-1] == user_id
        kept = labels[labels != -100]
        pieces = tok.decode(kept).replace("\n", "").split("<|user|>")
        assert pieces[-1] == "" and len(pieces) == 3, pieces
        assert pieces[0].replace("<think></think>", "") == "yes"
        assert pieces[1] == "<think>look</think>sure"


# ---------------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("builder", ["build", "build_moe"])
@pytest.mark.parametrize("stop", glm4v.EOS_TOKENS)
def test_greedy_generate_stops_at_glm_eos_as_stock(builder, stop):
    """Patched at zero bias, greedy generate writes what stock writes and stops where stock stops, on each of
    GLM's EOS ids. Construction: the stop token's output row is 1.05 × the row of the token stock greedy writes
    fifth, so greedy reaches the stop token by step 5 (the tiny model is random: it stops on nothing by itself)."""
    from avar_ops.hf import apply

    model, proc = getattr(glm4v, builder)(0, num_layers=2)
    tok = proc.tokenizer
    text = _render(proc, [USER_IMAGE], add_generation_prompt=True)
    batch = proc(text=[text], images=synthetic_images(1, seed=2), return_tensors="pt")
    n0 = batch["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        free = model.generate(**batch, **kwargs)[0, n0:]
        assert len(free) == 12 and not set(free.tolist()) & set(model.generation_config.eos_token_id)
        stop_id = tok.convert_tokens_to_ids(stop)
        model.lm_head.weight[stop_id] = 1.05 * model.lm_head.weight[int(free[4])]
        stock = model.generate(**batch, **kwargs)[0, n0:]
        handle = apply(model, proc)
        try:
            ours = model.generate(**batch, **kwargs)[0, n0:]
        finally:
            handle.revert()
    assert torch.equal(ours, stock)
    assert int(ours[-1]) == stop_id and len(ours) <= 5, tok.convert_ids_to_tokens(ours)


# ---------------------------------------------------------------------------------------------------------------
# Training through the patch


def _agto_run(builder: str, seed: int, alpha: float, beta: float, steps: int = 5):
    """User tokens' mean image mass before and after `steps` AdamW steps (lr 1e-3) of L_LM + α·L_enhance_img +
    β·L_suppress_sys on two system + image + question + answer conversations, labels from the response mask."""
    from avar_ops.hf import apply, collect_masses, token_groups
    from avar_ops.method import agto_losses, vas

    model, proc = getattr(glm4v, builder)(seed, num_layers=2)
    model.train()
    conversations = [
        [SYSTEM, USER_IMAGE, {"role": "assistant", "content": "<think>the square</think><answer>red</answer>"}],
        [
            {"role": "system", "content": "Look at the picture."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
            {"role": "assistant", "content": "<answer>two</answer>"},
        ],
    ]
    texts = [_render(proc, c) + "<|user|>" for c in conversations]  # the collator's turn_end
    proc.tokenizer.padding_side = "left"
    inputs = proc(text=texts, images=synthetic_images(2, seed=seed + 7), padding=True, return_tensors="pt")
    groups = token_groups(inputs["input_ids"], proc, inputs["attention_mask"])
    labels = inputs["input_ids"].masked_fill(~groups.response_mask, -100)  # [B, L]
    decoder = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    opt = torch.optim.AdamW(decoder, lr=1e-3, weight_decay=0.0)
    handle = apply(model, proc)
    masses = []
    try:
        for step in range(steps + 1):
            with collect_masses(model) as rec:
                out = model(**inputs, labels=labels, use_cache=False)
            masses.append(float(vas([m.detach() for m in rec.masses], groups.user_mask).image_mass.overall))
            if step == steps:
                break
            enhance, suppress = agto_losses(rec.masses, groups.user_mask, groups.image_mask, groups.system_mask)
            opt.zero_grad()
            (out.loss + alpha * enhance + beta * suppress).backward()
            opt.step()
    finally:
        handle.revert()
    return masses[0], masses[-1]


@pytest.mark.parametrize("builder", ["build", "build_moe"])
def test_agto_steps_raise_image_mass(builder):
    """Over seeds 0-2 (model and images): five AGTO steps raise the user tokens' image mass, and by more than five
    steps of L_LM alone from the same start, in every seed."""
    numbers = {}
    for seed in (0, 1, 2):
        start, agto = _agto_run(builder, seed, 0.15, 0.15)
        start_lm, lm_only = _agto_run(builder, seed, 0.0, 0.0)
        assert start == start_lm
        numbers[seed] = {"start": round(start, 5), "agto": round(agto, 5), "lm_only": round(lm_only, 5)}
    for n in numbers.values():
        assert n["agto"] > n["start"] and n["agto"] - n["start"] > n["lm_only"] - n["start"], numbers


@pytest.mark.parametrize("which", ["4.1V", "4.5V"])
def test_video_groups_match_a_hand_reading(tiny41, tiny45, which):
    """A video's frames (`<|image|>` blocks) are visual and its markers template (group 0); the frame timestamps
    the processor writes after each block are user text, group 3, like the user's words around the video (the
    rule docs/design.md gives for processor-inserted timestamps); a second turn with an image and the answer
    between them read as the hand reading says."""
    from transformers.video_utils import VideoMetadata

    from avar_ops.hf import token_groups

    _, proc = tiny41 if which == "4.1V" else tiny45
    video = {"type": "video"}
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "See "}, video, {"type": "text", "text": "What happens?"}],
        },
        ANSWER,
        USER_IMAGE,
    ]
    text = _render(proc, messages, add_generation_prompt=True)
    frames = np.random.default_rng(1).integers(0, 255, (6, 56, 56, 3), dtype=np.uint8)
    meta = VideoMetadata(total_num_frames=6, fps=2, duration=3.0, frames_indices=list(range(6)))
    out = proc(
        text=[text],
        videos=[frames],
        images=synthetic_images(1, seed=3),
        video_metadata=[meta],
        do_sample_frames=False,
        return_tensors="pt",
    )
    ids = out["input_ids"]
    tg = token_groups(ids, proc)
    groups, response = _hand_groups(proc, ids[0].tolist(), assistant_newline=which == "4.1V")
    assert tg.key_group[0].tolist() == groups
    assert tg.response_mask[0].tolist() == response
    toks = proc.tokenizer.convert_ids_to_tokens(ids[0])
    stamps = [i for i, t in enumerate(toks) if t in ("0", "1", "2")]
    assert len(stamps) == 3 and all(groups[i] == 3 for i in stamps)
    assert [toks[i - 1] for i in stamps] == ["<|end_of_image|>"] * 3
    assert proc.tokenizer.decode(ids[0][tg.user_mask[0]]) == "See 012What happens?What colour?"
