"""What is specific to Qwen3-VL and Qwen3-VL-MoE (tests/test_families.py runs the checks every family shares).

- DeepStack adds vision features into the hidden states of the first decoder layers at the visual positions:
  it must leave the token groups and the masses alone (masses still equal the sums of eager attention maps
  over the groups with DeepStack on, and DeepStack really changes this model's outputs);
- the MoE variant patched at zero bias equals the stock model (logits and greedy generation);
- a video's frames are preceded by timestamps in text (`<0.2 seconds>`): they are user text (group 3) by the
  rule of docs/design.md §2, and the groups of a video prompt equal those built piece by piece from the
  rendered template and the expanded video, its masses equal the eager maps' sums, and greedy decoding of it
  is unchanged by the patch.
"""

import re

import pytest
import torch

from avar_ops.analysis.tiny_families import qwen3_vl, qwen3_vl_moe
from avar_ops.analysis.tiny_qwen import synthetic_images
from avar_ops.core import Group, testing
from avar_ops.hf import apply, collect_masses, token_groups

G = 4
BUILDERS = {"qwen3_vl": qwen3_vl.build, "qwen3_vl_moe": qwen3_vl_moe.build}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    build = BUILDERS[request.param]
    model, processor = build(seed=0)
    eager, _ = build(seed=0, attn_implementation="eager")
    return request.param, model, eager, processor


def _image_batch(processor, seed=1):
    msgs = [
        [
            {"role": "system", "content": "You are a careful visual reasoning assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
        ],
        [{"role": "user", "content": [{"type": "text", "text": "Compare the two images."}, {"type": "image"}]}],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=synthetic_images(2, seed=seed), return_tensors="pt", padding=True)


def _video_messages(question="What moves in the video?"):
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
    ]


def _video_batch(processor, num_frames, seed=0):
    video, metadata = qwen3_vl.tiny_video(num_frames, seed=seed)
    text = processor.apply_chat_template(_video_messages(), add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], videos=[video], video_metadata=[metadata], return_tensors="pt")
    return batch, metadata


def _eager_masses(eager, batch, key_group):
    """Per-layer masses [B, H, L, G] from eager attention maps and the key groups."""
    with torch.no_grad():
        maps = eager(**batch, output_attentions=True).attentions  # per layer [B, H, L, L]
    onehot = torch.nn.functional.one_hot(key_group.long().clamp(min=0), G).float() * (key_group >= 0)[..., None]
    return [a @ onehot[:, None] for a in maps]  # [B, H, L, G]


def _check_masses(model, eager, processor, batch):
    groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group  # [B, L]
    handle = apply(model, processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            model(**batch)
    finally:
        handle.revert()
    want = _eager_masses(eager, batch, groups)
    v = batch["attention_mask"].bool()  # [B, L]
    assert len(rec.masses) == len(want) == model.config.text_config.num_hidden_layers
    for got, ref in zip(rec.masses, want):
        got, ref = got.permute(0, 2, 1, 3)[v], ref.permute(0, 2, 1, 3)[v]  # [tokens, H, G]
        assert testing.max_abs_err(got, ref) <= testing.FP32_MASS_ABS
    return groups


# --- DeepStack ---------------------------------------------------------------------------------------------


def test_deepstack_is_active_in_the_tiny_model(family):
    """Without this, the masses test below would not exercise DeepStack at all."""
    _, model, _, processor = family
    assert list(model.config.vision_config.deepstack_visual_indexes) == [0, 1]
    batch = _image_batch(processor)
    lm = model.model.language_model
    calls = []
    original = lm._deepstack_process

    def counting(hidden, mask, embeds):
        calls.append(int(mask.sum()))
        return original(hidden, mask, embeds)

    def skipped(hidden, mask, embeds):
        return hidden

    with torch.no_grad():
        lm._deepstack_process = counting
        try:
            with_ds = model(**batch).logits
        finally:
            del lm._deepstack_process
        lm._deepstack_process = skipped
        try:
            without = model(**batch).logits
        finally:
            del lm._deepstack_process
    n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert calls == [n_visual, n_visual]  # decoder layers 0 and 1, at every image position
    assert testing.rel_err(without, with_ds) > 1e-3


def test_deepstack_keeps_masses_equal_to_eager_maps(family):
    name, model, eager, processor = family
    batch = _image_batch(processor)
    groups = _check_masses(model, eager, processor, batch)
    v = batch["attention_mask"].bool()
    assert set(groups[v].tolist()) == {0, 1, 2, 3}


# --- MoE: patched equals stock -----------------------------------------------------------------------------


def test_moe_patched_at_zero_bias_equals_stock():
    model, processor = qwen3_vl_moe.build(seed=0)
    assert type(model.model.language_model.layers[0].mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    batch = _image_batch(processor)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model(**batch).logits
        stock = model.generate(**batch, **kwargs)
    handle = apply(model, processor)
    try:
        with torch.no_grad():
            out = model(**batch).logits
            ours = model.generate(**batch, **kwargs)
    finally:
        handle.revert()
    v = batch["attention_mask"].bool()
    assert testing.rel_err(out[v], ref[v]) <= testing.FP32_MODEL_REL
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        assert testing.rel_err(a, b) <= testing.FP32_MODEL_REL


# --- video timestamps --------------------------------------------------------------------------------------


def _expected_video_pieces(batch, metadata, question):
    """(text, group) pieces of the video prompt, built from the template's layout and the processor's rule:
    per temporal patch of 2 frames, `<T seconds>` with T the mean time of its frames (one decimal), then the
    frame's pads between vision markers, all inside the vision markers the template put around the video."""
    t, h, w = batch["video_grid_thw"][0].tolist()
    per_frame = h * w // 4
    times = [i / metadata["fps"] for i in range(metadata["total_num_frames"])]
    stamps = [(times[2 * k] + times[2 * k + 1]) / 2 for k in range(t)]
    pieces = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>", Group.SYSTEM),
        ("\n<|im_start|>user\n<|vision_start|>", Group.OTHER),
    ]
    for stamp in stamps:
        pieces += [
            (f"<{stamp:.1f} seconds>", Group.USER),
            ("<|vision_start|>", Group.OTHER),
            ("<|video_pad|>" * per_frame, Group.VISUAL),
            ("<|vision_end|>", Group.OTHER),
        ]
    pieces += [
        ("<|vision_end|>", Group.OTHER),
        (question, Group.USER),
        ("<|im_end|>\n<|im_start|>assistant\n", Group.OTHER),
    ]
    return pieces, stamps


@pytest.mark.parametrize("num_frames", [4, 6])
def test_video_timestamps_are_user_text(num_frames):
    model, processor = qwen3_vl.build(seed=0)
    question = "What moves in the video?"
    batch, metadata = _video_batch(processor, num_frames)
    pieces, stamps = _expected_video_pieces(batch, metadata, question)
    assert len(stamps) == num_frames // 2
    tok = processor.tokenizer
    ids, want = [], []
    for text, group in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        want += [int(group)] * len(piece)
    # The pieces, tokenized one by one, are exactly the processor's sequence: the layout above is the real one.
    assert batch["input_ids"][0].tolist() == ids
    got = token_groups(batch["input_ids"], processor, batch["attention_mask"])
    assert got.key_group[0].tolist() == want
    # The user mask is the timestamps and the question, nothing else.
    user_text = tok.decode(batch["input_ids"][0][got.user_mask[0]])
    assert user_text == "".join(f"<{s:.1f} seconds>" for s in stamps) + question


def test_video_masses_equal_eager_maps():
    model, processor = qwen3_vl.build(seed=0)
    eager, _ = qwen3_vl.build(seed=0, attn_implementation="eager")
    batch, _ = _video_batch(processor, 4)
    groups = _check_masses(model, eager, processor, batch)
    assert set(groups[0].tolist()) == {0, 1, 2, 3}


def test_video_generate_matches_stock():
    """Greedy decoding of a video prompt (timestamps, per-frame markers, MRoPE over frames) is unchanged."""
    model, processor = qwen3_vl.build(seed=0)
    batch, _ = _video_batch(processor, 6)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        stock = model.generate(**batch, **kwargs)
    handle = apply(model, processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            ours = model.generate(**batch, **kwargs)
    finally:
        handle.revert()
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        assert testing.rel_err(a, b) <= testing.FP32_MODEL_REL
    # The last decode step puts mass on the video's pads, the system prompt and the user text (timestamps and
    # question) of the prompt.
    assert (rec.steps[-1][0][:, :, 0, 1:] > 0).all()


# --- bad arguments of the tiny builders --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(deepstack_layers=(0, 2)), "deepstack_layers must be distinct vision block indices in [0, 2)"),
        (dict(deepstack_layers=(1, 1)), "deepstack_layers must be distinct"),
        (dict(num_layers=1, deepstack_layers=(0, 1)), "2 DeepStack feature maps need at least as many decoder"),
        (dict(hidden_size=102), "hidden_size % num_heads == 0"),
        (dict(hidden_size=100), "head_dim = hidden_size / num_heads must be even"),
    ],
)
def test_tiny_qwen3_vl_refuses_bad_sizes(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        qwen3_vl.build(**kwargs)


def test_tiny_qwen3_vl_default_deepstack_fits_the_decoder():
    model, _ = qwen3_vl.build(num_layers=1)
    assert list(model.config.vision_config.deepstack_visual_indexes) == [0]


def test_tiny_moe_refuses_bad_expert_counts():
    with pytest.raises(ValueError, match="num_experts_per_tok <= num_experts"):
        qwen3_vl_moe.build(num_experts=2, num_experts_per_tok=3)


def test_tiny_video_refuses_a_single_frame():
    with pytest.raises(ValueError, match="num_frames must be >= 2"):
        qwen3_vl.tiny_video(1)
