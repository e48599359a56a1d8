"""What is specific to LLaVA-OneVision and InternVL (the checks every family passes are in test_families.py).

LLaVA-OneVision: an image is an AnyRes base view, a grid of tiles (unpadded to the image's aspect ratio) and one
image-newline vector per grid row; the processor writes all of them as `<image>` tokens, so every one is visual
(group 1), and the masses over the groups still equal the sums of eager attention maps on multi-tile images.

InternVL: the processor writes an image as `<img>` + `<IMG_CONTEXT>` × (tokens per tile × tiles) + `</img>`;
`<IMG_CONTEXT>` is visual, `<img>` / `</img>` are template tokens (group 0), never user text. A video becomes
one `FrameN: <img>…</img>` line per frame with the same `<IMG_CONTEXT>` token. The Qwen3 backbone (InternVL3.5)
is patched like the Qwen2 one.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from avar_ops.analysis.tiny_families import internvl, llava_onevision
from avar_ops.core import Group, testing
from avar_ops.hf import apply, collect_masses, token_groups

G = 4

# Sizes that give 1×1 to 3×1 tile grids, tall and wide unpadding, and a grid row count of 1 to 6.
SHAPES = [(28, 28), (84, 28), (56, 56), (30, 90), (56, 112), (112, 40)]


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    w, h = size
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _user_turn(text="Describe the image.", images=1):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _batch(processor, messages, images, side="left"):
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    processor.tokenizer.padding_side = side
    return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side=side)


def _ref_masses(eager_model, batch, groups):
    """Per-layer masses [B, H, L, G] from eager attention maps and the key groups."""
    with torch.no_grad():
        maps = eager_model(**batch, output_attentions=True).attentions  # per layer [B, H, L, L]
    onehot = torch.nn.functional.one_hot(groups.long().clamp(min=0), G).float() * (groups >= 0)[..., None]  # [B, L, G]
    return [a @ onehot[:, None] for a in maps]


def _check_masses(model, eager_model, processor, batch):
    groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group  # [B, L]
    handle = apply(model, processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            model(**batch)
    finally:
        handle.revert()
    ref = _ref_masses(eager_model, batch, groups)
    v = batch["attention_mask"].bool()
    assert len(rec.masses) == len(ref) == model.config.text_config.num_hidden_layers
    for mass, want in zip(rec.masses, ref):
        got, want = mass.permute(0, 2, 1, 3)[v], want.permute(0, 2, 1, 3)[v]  # [tokens, H, G]
        assert testing.max_abs_err(got, want) <= testing.FP32_MASS_ABS
    return groups


# ------------------------------------------------------------------------------------------ LLaVA-OneVision


@pytest.fixture(scope="module")
def onevision():
    model, processor = llava_onevision.build(seed=0)
    eager, _ = llava_onevision.build(seed=0, attn_implementation="eager")
    return model, eager, processor


def _embeddings(model, batch):
    """inputs_embeds [B, L, D] as the language model receives them (image features merged in)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("size", SHAPES)
def test_onevision_newlines_and_tiles_stand_on_image_tokens_and_are_visual(onevision, size):
    model, _, processor = onevision
    batch = _batch(processor, [_user_turn()], [_image(size, seed=size[0] + size[1])])
    ids = batch["input_ids"][0]  # [L]
    image = ids == model.config.image_token_id
    embeds = _embeddings(model, batch)[0]  # [L, D]
    newline = (embeds - model.model.image_newline).abs().amax(-1) == 0  # [L]
    # One newline per row of the unpadded tile grid: at least one, and only on <image> positions.
    assert newline.sum() >= 1 and not (newline & ~image).any()
    # The base view (4 tokens) comes first, then rows that each end with a newline.
    first = int(image.nonzero()[0])
    assert not newline[first : first + 4].any()
    assert newline[int(image.nonzero()[-1])]
    groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group[0]  # [L]
    assert (groups[image] == Group.VISUAL).all() and (groups[newline] == Group.VISUAL).all()
    assert not (groups[~image] == Group.VISUAL).any()
    # The "\n" the template writes after `<image>` is the template's (group 0); the question is user text.
    after = int(image.nonzero()[-1]) + 1
    assert processor.tokenizer.decode(ids[after : after + 1]) == "\n" and groups[after] == Group.OTHER
    assert (groups[after + 1 :] == Group.USER).any()


def test_onevision_masses_equal_eager_maps_on_multi_tile_images(onevision):
    model, eager, processor = onevision
    messages = [
        [{"role": "system", "content": [{"type": "text", "text": "You are a careful visual reasoning assistant."}]}]
        + _user_turn("What is it?"),
        _user_turn("Compare the two images.", images=2),
    ]
    # Images per sample, as the entry points pass them: a single image is tiled (AnyRes), each image of a
    # multi-image sample is its base view plus one newline.
    images = [[_image((56, 112), 1)], [_image((84, 28), 2), _image((56, 56), 3)]]
    for side in ("left", "right"):
        batch = _batch(processor, messages, images, side)
        assert (batch["input_ids"][0] == model.config.image_token_id).sum() > 5
        assert (batch["input_ids"][1] == model.config.image_token_id).sum() == 2 * 5
        groups = _check_masses(model, eager, processor, batch)
        v = batch["attention_mask"].bool()
        assert set(groups[v].tolist()) == {0, 1, 2, 3}
        assert (groups == Group.VISUAL).sum() == (batch["input_ids"] == model.config.image_token_id).sum()


# ---------------------------------------------------------------------------------------------------- InternVL


@pytest.fixture(scope="module", params=internvl.BACKBONES)
def intern(request):
    model, processor = internvl.build(seed=0, backbone=request.param)
    eager, _ = internvl.build(seed=0, backbone=request.param, attn_implementation="eager")
    return model, eager, processor


def test_internvl_backbone_is_the_requested_language_model(intern):
    model, _, _ = intern
    backbone = model.config.text_config.model_type
    assert backbone in internvl.BACKBONES
    assert type(model.model.language_model).__name__.lower().startswith(backbone)


@pytest.mark.parametrize("size", SHAPES)
def test_internvl_markers_are_template_tokens_and_context_tokens_visual(intern, size):
    model, _, processor = intern
    tok = processor.tokenizer
    batch = _batch(processor, [_user_turn()], [_image(size, seed=size[0] * size[1])])
    ids = batch["input_ids"][0]  # [L]
    start, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    context = ids == model.config.image_token_id
    tiles = batch["pixel_values"].shape[0]
    assert context.sum() == internvl.TOKENS_PER_TILE * tiles
    # <img>, then every <IMG_CONTEXT>, then </img>: one contiguous run between the markers.
    (s,), (e,) = (ids == start).nonzero()[:, 0].tolist(), (ids == end).nonzero()[:, 0].tolist()
    assert context[s + 1 : e].all() and context.sum() == e - s - 1
    groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group[0]  # [L]
    assert (groups[context] == Group.VISUAL).all() and not (groups[~context] == Group.VISUAL).any()
    assert groups[s] == Group.OTHER and groups[e] == Group.OTHER
    # The "\n" the template writes after the image part is the template's too; the question is user text.
    assert tok.decode(ids[e + 1 : e + 2]) == "\n" and groups[e + 1] == Group.OTHER
    question = tok.decode(ids[groups == Group.USER])
    assert question == "Describe the image.", question


def test_internvl_masses_equal_eager_maps(intern):
    model, eager, processor = intern
    messages = [
        [{"role": "system", "content": [{"type": "text", "text": "You are a careful visual reasoning assistant."}]}]
        + _user_turn("What is it?"),
        _user_turn("Compare the two images.", images=2),
    ]
    images = [[_image((56, 112), 1)], [_image((84, 28), 2), _image((56, 56), 3)]]
    for side in ("left", "right"):
        batch = _batch(processor, messages, images, side)
        groups = _check_masses(model, eager, processor, batch)
        v = batch["attention_mask"].bool()
        assert set(groups[v].tolist()) == {0, 1, 2, 3}


# ------------------------------------------------------------------- the template's text around an image part


def test_template_text_around_an_image_part_is_learned_and_grouped_as_template():
    """A template that writes "Picture: <image>\\n" (text before and after the placeholder): the learner finds
    both from a rendering with and without the image part; in the ids they are group 0 next to a placeholder,
    while the same words typed by the user elsewhere stay user text. Qwen's template writes no such text."""
    from avar_ops.analysis.tiny_qwen import build_tiny_processor
    from avar_ops.hf import template_tokens

    processor = llava_onevision.build_processor()
    tok = processor.tokenizer
    processor.chat_template = llava_onevision.CHAT_TEMPLATE.replace("<image>\n", "Picture: <image>\n")
    t = template_tokens(processor)
    assert [tok.decode(list(h)) for h in t.part_heads] == ["Picture: "]
    assert [tok.decode(list(h)) for h in t.part_tails] == ["\n"]
    qwen = template_tokens(build_tiny_processor())
    assert qwen.part_heads == () and qwen.part_tails == ()

    question = "Picture: a red square.\nIs it red?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "Picture: <image>\nPicture: a red square." in text
    batch = processor(text=[text], images=[[_image((56, 56), 0)]], return_tensors="pt")
    groups = token_groups(batch["input_ids"], processor).key_group[0]  # [L]
    ids = batch["input_ids"][0]
    assert tok.decode(ids[groups == Group.USER]) == question
    image = (ids == processor.image_token_id).nonzero()[:, 0]
    head = tok.encode("Picture: ", add_special_tokens=False)
    assert (groups[int(image[0]) - len(head) : int(image[0])] == Group.OTHER).all()
    assert groups[int(image[-1]) + 1] == Group.OTHER


# ---------------------------------------------------------------------------------------- backbones


def test_internvl_qwen3_backbone_zero_bias_logits_and_greedy_generate_are_stock():
    model, processor = internvl.build(seed=1, backbone="qwen3")
    assert model.model.language_model.layers[0].self_attn.q_norm is not None  # Qwen3's per-head q/k norms
    messages = [_user_turn("What is it?"), _user_turn("Compare the two images.", images=2)]
    batch = _batch(processor, messages, [[_image((56, 112), 4)], [_image((84, 28), 5), _image((56, 56), 6)]])
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = model(**batch).logits  # [B, L, V]
        ref_seq = model.generate(**batch, **kwargs)
    handle = apply(model, processor)
    try:
        assert handle.attention_layers == list(range(model.config.text_config.num_hidden_layers))
        with torch.no_grad():
            out = model(**batch).logits
            seq = model.generate(**batch, **kwargs)
    finally:
        handle.revert()
    v = batch["attention_mask"].bool()
    assert testing.rel_err(out[v], ref[v]) <= testing.FP32_MODEL_REL
    assert torch.equal(seq, ref_seq)


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_an_unchecked_language_backbone_is_refused_in_one_line(family):
    """Other backbones may route attention differently (GPT-OSS: sinks, sliding windows): refused, not guessed."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    text = dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    if family == "internvl":
        config = InternVLConfig(
            text_config=text,
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=56, patch_size=14),
            image_token_id=3,
        )  # fmt: skip
        model = InternVLForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(
            text_config=text,
            vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
            image_token_index=3, video_token_index=4,
        )  # fmt: skip
        model = LlavaOnevisionForConditionalGeneration(config)
    impl = model.config.text_config._attn_implementation
    with pytest.raises(NotImplementedError, match=r"with a 'llama' language model is not supported \(checked: "):
        apply(model)
    assert model.config.text_config._attn_implementation == impl  # nothing was switched


def test_a_template_that_reads_only_lists_of_parts_is_learned():
    """Like llava-hf's OneVision template, the tiny one renders a plain string content to nothing; the learner
    then renders its sentinels as text parts and finds the same layout as for a template that takes both."""
    from avar_ops.hf import template_tokens

    processor = llava_onevision.build_processor()
    tok = processor.tokenizer
    dropped = processor.apply_chat_template([{"role": "user", "content": "Walrus"}], tokenize=False)
    assert "Walrus" not in dropped
    t = template_tokens(processor)
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert t.openers == (im_start,) and t.closer == im_end
    assert [tok.decode(list(h)) for h in t.headers] == [f"<|im_start|>{r}" for r in ("system", "user", "assistant")]
    assert set(t.visual) == {tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>")}
