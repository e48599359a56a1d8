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
