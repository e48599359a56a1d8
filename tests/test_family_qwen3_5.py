"""What is particular to Qwen3.5 (the checks every family passes are in test_families.py).

Qwen3.5's decoder is hybrid: Gated DeltaNet (linear attention) layers and gated softmax-attention layers. Only
the softmax layers go through avar; the tiny model has 4 decoder layers of which 1 and 3 are softmax attention,
so every index above the patch (tables, masses, `layers=`, VAS layers) counts those two, and
`handle.attention_layers` maps them back to decoder layers 1 and 3. Checked here:

- the linear-attention layers keep transformers' own implementation (run on CPU with no extra package) and,
  given the same inputs, give bit-identical outputs with and without the patch;
- masses come for the softmax layers only, in order, each from the decoder layer `handle.attention_layers` names
  (a bias on attention layer k changes decoder layer attention_layers[k] and nothing before it);
- a VAS report says which layers it is over, both ways;
- greedy `generate` (the hybrid cache: conv and recurrent states for the linear layers, keys and values for the
  softmax ones) gives stock SDPA's tokens through avar's prefill and decode, for a left-padded batch with images;
- the template's think blocks: the generation prompt's `<think>` and the empty think block of an answered turn
  belong to the response, whatever the groups of the turns around them; the dense and MoE variants share all of
  this.
"""

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

from avar_ops.analysis import vas
from avar_ops.analysis.image_attention import image_attention
from avar_ops.analysis.tiny_families import qwen3_5
from avar_ops.analysis.tiny_qwen import synthetic_images
from avar_ops.core import Group
from avar_ops.hf import apply, collect_masses, template_tokens, token_groups
from avar_ops.method import Intervention
from avar_ops.method.intervention import patch_tables

ATTENTION_LAYERS = [1, 3]  # decoder layers with softmax attention in the tiny model (every second one)
SYSTEM = "You are a careful visual reasoning assistant."


@pytest.fixture(scope="module")
def tiny():
    return qwen3_5.build(seed=0)


def _conversations():
    return [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
        ],
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles are there?"}]},
            {"role": "assistant", "content": "There are two circles."},
            {"role": "user", "content": "Look at the image again. Are you sure?"},
        ],
    ]


def _batch(processor, seed=1):
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in _conversations()]
    processor.tokenizer.padding_side = "left"
    images = synthetic_images(2, seed=seed)
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def test_layer_layout_and_handle(tiny):
    model, processor = tiny
    decoder = model.model.language_model
    assert [i for i, t in enumerate(decoder.config.layer_types) if t == "full_attention"] == ATTENTION_LAYERS
    handle = apply(model, processor)
    try:
        assert list(handle.attention_layers) == ATTENTION_LAYERS
    finally:
        handle.revert()


def _linear_io(model, batch):
    """Per linear-attention decoder layer: (its inputs, its output) in one forward, captured by hooks."""
    decoder = model.model.language_model
    seen, hooks = {}, []
    for i, layer in enumerate(decoder.layers):
        if hasattr(layer, "linear_attn"):

            def hook(module, args, kwargs, output, i=i):
                seen[i] = (args, {k: v for k, v in kwargs.items()}, output.detach().clone())

            hooks.append(layer.linear_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_linear_attention_layers_are_untouched(tiny):
    """The patch leaves the Gated DeltaNet layers alone: same class and forward, no patch state, and given the
    inputs they got in a patched forward (left padding included: their 2D padding mask) their outputs are
    bit-identical with the patch applied and after it is reverted."""
    model, processor = tiny
    batch = _batch(processor)
    assert not batch["attention_mask"].all(), "the batch must be padded, so the linear layers' mask is exercised"
    decoder = model.model.language_model
    linear = {i: layer.linear_attn for i, layer in enumerate(decoder.layers) if hasattr(layer, "linear_attn")}
    assert sorted(linear) == [0, 2]
    forwards = {i: m.forward for i, m in linear.items()}
    handle = apply(model, processor)
    try:
        for i, m in linear.items():
            assert type(m) is Qwen3_5GatedDeltaNet and "forward" not in vars(m) and m.forward == forwards[i]
            assert not hasattr(m, "_avar_state")
        captured = _linear_io(model, batch)
        assert sorted(captured) == [0, 2]
        patched_again = {}
        with torch.no_grad():
            for i, (args, kwargs, _) in captured.items():
                patched_again[i] = linear[i](*args, **kwargs)
    finally:
        handle.revert()
    with torch.no_grad():
        for i, (args, kwargs, out) in captured.items():
            assert kwargs.get("attention_mask") is not None  # the padding mask reached the linear layer
            assert torch.equal(linear[i](*args, **kwargs), out), f"linear layer {i} changed under the patch"
            assert torch.equal(patched_again[i], out)


def test_masses_are_per_attention_layer_with_their_decoder_index(tiny):
    """Masses: one per softmax layer, in order. A bias on attention layer k changes what decoder layer
    attention_layers[k] outputs and leaves every decoder layer before it bit-identical."""
    model, processor = tiny
    batch = _batch(processor)
    decoder = model.model.language_model
    outputs, hooks = {}, []
    for i, layer in enumerate(decoder.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach().clone())))
    try:
        runs = {}
        for biased in (None, 0, 1):
            bias = None if biased is None else torch.tensor([0.0, 2.0, 0.0, 0.0])
            layers = None if biased is None else [biased]
            handle = apply(model, processor, bias=bias, layers=layers)
            try:
                with collect_masses(model) as rec, torch.no_grad():
                    model(**batch, use_cache=False)
                runs[biased] = (dict(outputs), rec.masses)
                assert list(handle.attention_layers) == ATTENTION_LAYERS
            finally:
                handle.revert()
    finally:
        for h in hooks:
            h.remove()
    base_out, base_masses = runs[None]
    assert len(base_masses) == len(ATTENTION_LAYERS)
    valid = batch["attention_mask"].bool()  # [B, L]
    for k, decoder_layer in enumerate(ATTENTION_LAYERS):
        out, masses = runs[k]
        for d in range(decoder_layer):
            assert torch.equal(out[d], base_out[d]), f"bias on attention layer {k} changed decoder layer {d}"
        changed = (out[decoder_layer] - base_out[decoder_layer])[valid].abs().max()
        assert changed > 1e-3, f"bias on attention layer {k} did not reach decoder layer {decoder_layer}"
        # Its own masses move towards the visual keys; the layers before it keep theirs.
        for j in range(k):
            assert torch.equal(masses[j], base_masses[j])
        vis = masses[k][..., Group.VISUAL][valid[:, None].expand_as(masses[k][..., 0])]
        base_vis = base_masses[k][..., Group.VISUAL][valid[:, None].expand_as(masses[k][..., 0])]
        assert vis.mean() > base_vis.mean()


def test_vas_report_says_which_layers(tiny, tmp_path):
    model, processor = tiny
    samples = [
        {"id": "a", "images": synthetic_images(1, seed=3), "question": "What colour is the square?", "system": SYSTEM},
        {"id": "b", "images": synthetic_images(1, seed=4), "question": "Describe the image.", "system": SYSTEM},
    ]
    report = vas.measure(model, processor, samples, progress=False, label="qwen3_5")
    assert report.num_layers == 2 and report.num_decoder_layers == 4 and report.model_type == "qwen3_5"
    assert report.layers == [0, 1] and report.attention_layers == ATTENTION_LAYERS
    assert report.decoder_layers == ATTENTION_LAYERS
    assert len(report.per_layer["vas"]) == 2 and len(report.per_layer_head["vas"][0]) == 4
    assert "decoder layers 1, 3 of 4" in report.summary()
    last = vas.measure(model, processor, samples, layers=[-1], progress=False, label="last")
    assert last.layers == [1] and last.decoder_layers == [3]
    assert last.per_layer["vas"] == pytest.approx(report.per_layer["vas"][1:], rel=1e-6)
    report.save(str(tmp_path))
    loaded = vas.VASReport.load(str(tmp_path))
    assert loaded.decoder_layers == ATTENTION_LAYERS and loaded.num_decoder_layers == 4
    # Without a system prompt Qwen3.5's template renders no system turn: VAS (visual / system) is undefined.
    bare = [{**samples[0], "system": None}, samples[1]]
    partial = vas.measure(model, processor, bare, progress=False)
    assert [s["id"] for s in partial.skipped] == ["a"]
    assert partial.skipped[0]["reason"].startswith("no system turn")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_generate_with_the_hybrid_cache_equals_stock_greedy(moe):
    """Greedy tokens through avar (prefill and cached decode: the linear layers' conv / recurrent states and
    the softmax layers' keys and values in one hybrid cache) equal stock SDPA's, for a left-padded batch with
    images; and every decode step's masses are those of the two softmax layers."""
    model, processor = qwen3_5.build(seed=2, moe=moe) if moe else qwen3_5.build(seed=0)
    batch = _batch(processor, seed=5)
    kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with torch.no_grad():
        stock = model.generate(**batch, **kwargs)
    handle = apply(model, processor)
    try:
        with collect_masses(model) as rec, torch.no_grad():
            ours = model.generate(**batch, **kwargs)
        steps = rec.steps
    finally:
        handle.revert()
    assert torch.equal(ours, stock)
    prompt = batch["input_ids"].shape[1]
    assert len(steps) == kwargs["max_new_tokens"]
    assert all(len(step) == len(ATTENTION_LAYERS) for step in steps)
    assert steps[0][0].shape[2] == prompt and all(s[0].shape[2] == 1 for s in steps[1:])
    # The cached steps keep the prompt's groups: the image keys still draw mass at the last step.
    assert steps[-1][1][..., Group.VISUAL].sum() > 0
    # The outputs depend on the input (a model whose greedy output ignored it would pass trivially).
    assert not torch.equal(ours[0, prompt:], ours[1, prompt:])


def test_think_blocks_are_response(tiny):
    """The generation prompt's `<think>` and an answered turn's (empty) think block are response tokens, in
    group 0; the user text around them keeps group 3 and the system turn group 2."""
    _, processor = tiny
    tok = processor.tokenizer
    think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    conv = _conversations()[1]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    answered = processor.apply_chat_template(
        conv + [{"role": "assistant", "content": "Yes, two."}], add_generation_prompt=False, tokenize=False
    )
    no_think = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert answered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nYes, two.<|im_end|>\n")
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The earlier answered turn (before the last user turn) carries no think block, as in the real template.
    assert "<|im_start|>assistant\nThere are two circles.<|im_end|>" in prompt
    t = template_tokens(processor)
    for text in (prompt, answered, no_think):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        g = token_groups(ids, t)
        last_start = (ids[0] == tok.convert_tokens_to_ids("<|im_start|>")).nonzero().max()
        in_think = (ids[0] == think) | (ids[0] == end_think)
        assert in_think[last_start:].any()
        assert g.response_mask[0, in_think & (torch.arange(ids.shape[1]) > last_start)].all(), text
        assert (g.key_group[0, in_think] == Group.OTHER).all()
        assert (g.key_group[0] == Group.SYSTEM).any() and (g.key_group[0] == Group.USER).any()
        # Nothing after the last assistant header is user or system.
        assert (g.key_group[0, last_start:] == Group.OTHER).all()


def test_intervention_and_image_maps_act_on_the_softmax_layers(tiny):
    """An intervention's tables are [2, H, 4] (the softmax layers); one on the last attention layer raises that
    layer's VAS and leaves the first one's unchanged; image maps take attention-layer indices too."""
    model, processor = tiny
    samples = [
        {"id": "a", "images": synthetic_images(1, seed=3), "question": "What colour is the square?", "system": SYSTEM}
    ]
    tables = patch_tables(model, Intervention(mode="bias", beta_img=2.0, layers=(-1,)))
    assert tuple(tables["bias"].shape) == (2, 4, 4)
    base = vas.measure(model, processor, samples, progress=False)
    steered = vas.measure(
        model, processor, samples, progress=False, intervention=Intervention(mode="bias", beta_img=2.0, layers=(-1,))
    )
    assert steered.per_layer["vas"][0] == pytest.approx(base.per_layer["vas"][0], rel=1e-6)
    assert steered.per_layer["vas"][1] > 1.5 * base.per_layer["vas"][1]
    maps = image_attention(model, processor, samples[0], layers=[-1])
    assert maps.layers == [1] and len(maps.maps) == 1 and maps.maps[0].sum() > 0


def test_a_template_with_a_think_block_in_every_assistant_turn(tiny):
    """A variant of the template that keeps a think block in every assistant turn, earlier ones included (as
    templates that preserve reasoning across turns do): the learned assistant header is still
    `<|im_start|>assistant` + "\\n", so a generation prompt and an answered turn with reasoning have their
    think block, reasoning and answer as response; without that, the block became part of the header and no
    turn matched it (an empty response mask)."""
    from avar_ops.hf.chat_template import template_tokens as learn

    _, processor = tiny
    tok = processor.tokenizer
    variant = qwen3_5.CHAT_TEMPLATE.replace("{%- if loop.index0 > counts.last_user %}", "{%- if true %}")
    assert variant != qwen3_5.CHAT_TEMPLATE

    class Variant:  # the processor with the variant template (the learner reads .chat_template and .tokenizer)
        chat_template = variant
        tokenizer = tok
        image_token, video_token = processor.image_token, processor.video_token

    shown = tok.apply_chat_template(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "?"},
        ],
        chat_template=variant,
        tokenize=False,
    )
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>" in shown
    t = learn(Variant())
    assistant = tok.convert_ids_to_tokens(list(t.headers[2]) + list(t.header_tails[2]))
    assert assistant == ["<|im_start|>", "assistant", "Ċ"]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is it?"}]
    for text, answer in (
        (tok.apply_chat_template(msgs, chat_template=variant, tokenize=False, add_generation_prompt=True), None),
        (
            tok.apply_chat_template(
                msgs + [{"role": "assistant", "content": "A square.", "reasoning_content": "It is red."}],
                chat_template=variant,
                tokenize=False,
            ),
            "A square.",
        ),
    ):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        g = token_groups(ids, t)
        start = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
        want = tok.encode(text[start:], add_special_tokens=False)
        if answer is not None:
            want = want[:-1]  # the "\n" after <|im_end|> is between turns
        got = ids[0, g.response_mask[0]].tolist()
        assert got == want, text
