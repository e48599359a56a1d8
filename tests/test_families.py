"""The same checks for every supported family, on its tiny random model (`avar_ops.analysis.tiny_families`).

For each family: the patched model at zero bias gives stock SDPA's logits; the masses equal the sums of eager
`output_attentions` maps over groups read from the token ids; a bias / logit scale equals an eager reference;
greedy `generate` is unchanged at zero bias and its cached decode steps keep the prompt's groups; AGTO gradients
equal those of eager maps; the groups equal the spans the family's own chat template renders (sentinel words
located in the decoded text, independently of the learned layout).
"""

import pytest
import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from avar_ops.analysis.tiny_families import build_tiny, tiny_family_names
from avar_ops.analysis.tiny_qwen import synthetic_images
from avar_ops.core import testing
from avar_ops.hf import (
    apply,
    attention_layer_indices,
    collect_masses,
    family_of,
    load_pretrained,
    revert,
    supported_families,
    token_groups,
)

G = 4
FAMILIES = tiny_family_names()
REF_IMPL = "avar_test_family_eager_bias"


def test_every_supported_family_has_a_tiny_model():
    assert sorted(f.name for f in supported_families()) == FAMILIES


def test_an_unknown_family_is_refused_naming_the_supported_ones():
    cfg = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match=r"model type 'qwen2' \(Qwen2ForCausalLM\) is not a supported family; "):
        apply(transformers.Qwen2ForCausalLM(cfg))
    with pytest.raises(ValueError, match="Qwen2.5-VL \\(qwen2_5_vl\\)"):
        apply(transformers.Qwen2ForCausalLM(cfg))


def test_the_checkpoint_config_decides_the_family(tmp_path):
    """A saved checkpoint of each family loads as that family, and its shape is read without its weights."""
    from avar_ops.analysis import model_shape

    for name in FAMILIES:
        model, processor = build_tiny(name, seed=0)
        folder = tmp_path / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        shape = model_shape(str(folder))
        assert shape.family == name and shape.num_layers == len(apply(model).attention_layers)
        revert(model)
        assert family_of(load_pretrained(str(folder))).name == name


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(family):
    return build_tiny(family, seed=0)


@pytest.fixture(scope="module")
def eager(family):
    model, _ = build_tiny(family, seed=0, attn_implementation="eager")
    return model


def _messages():
    return [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}],
        [
            {"role": "system", "content": [{"type": "text", "text": "You are a careful visual reasoning assistant."}]},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Compare the two images."}, {"type": "image"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "The first one has more shapes."}]},
            {"role": "user", "content": [{"type": "text", "text": "Look back at the image. Are you sure?"}]},
        ],
    ]


def _n_images(messages):
    return sum(1 for turn in messages for part in turn["content"] if part.get("type") == "image")


def make_batch(processor, side: str, messages=None, generation_prompt=True):
    msgs = messages if messages is not None else _messages()
    texts = [processor.apply_chat_template(m, add_generation_prompt=generation_prompt, tokenize=False) for m in msgs]
    images = synthetic_images(sum(_n_images(m) for m in msgs), seed=1)
    processor.tokenizer.padding_side = side
    kwargs = {"images": images} if images else {}
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def _valid(batch):
    return batch["attention_mask"].bool()  # [B, L]


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", cfg)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits  # [B, L, V]


@pytest.mark.parametrize("side", ["left", "right"])
def test_zero_bias_logits_match_sdpa(tiny, side):
    model, processor = tiny
    batch = make_batch(processor, side)
    assert not _valid(batch).all(), "the batch must contain padding"
    ref = _logits(model, batch)
    handle = apply(model, processor)
    try:
        assert _text_config(model)._attn_implementation == "avar"
        out = _logits(model, batch)
    finally:
        handle.revert()
    assert _text_config(model)._attn_implementation == "sdpa"
    v = _valid(batch)
    assert torch.isfinite(out[v]).all()
    assert testing.rel_err(out[v], ref[v]) <= testing.FP32_MODEL_REL


def _ref_masses(eager_model, batch, groups, decoder_layers):
    """Per attention layer: masses [B, H, L, G] from eager attention maps and the key groups."""
    with torch.no_grad():
        maps = eager_model(**batch, output_attentions=True).attentions  # per decoder layer [B, H, L, L]
    if len(maps) != len(decoder_layers):  # one entry per decoder layer, linear-attention ones included
        maps = [maps[i] for i in decoder_layers]
    onehot = torch.nn.functional.one_hot(groups.long().clamp(min=0), G).float() * (groups >= 0)[..., None]  # [B, L, G]
    return [a.float() @ onehot[:, None] for a in maps]


@pytest.mark.parametrize("side", ["left", "right"])
def test_masses_match_eager_maps(tiny, eager, side):
    model, processor = tiny
    batch = make_batch(processor, side)
    groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group  # [B, L]
    handle = apply(model, processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            model(**batch)
        layers = handle.attention_layers
    finally:
        handle.revert()
    ref = _ref_masses(eager, batch, groups, layers)
    assert len(rec.masses) == len(ref) == len(layers)
    v = _valid(batch)
    for mass, want in zip(rec.masses, ref):
        assert mass.dtype == torch.float32 and mass.shape == want.shape
        got, want = mass.permute(0, 2, 1, 3)[v], want.permute(0, 2, 1, 3)[v]  # [tokens, H, G]
        assert testing.max_abs_err(got, want) <= testing.FP32_MASS_ABS
    assert set(groups[v].tolist()) == {0, 1, 2, 3}, "every group must be present so every mass column is checked"


_REF = {}


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with s = scale·q·k·γ[h, g(j)] + β[h, g(j)] + mask; query [B, H, Lq, D]."""
    H, Hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    v = value.repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    g = _REF["groups"].long().clamp(min=0)  # [B, Lk]
    bias, gamma = _REF["tables"][module.layer_idx]  # [H, G] each
    bias_map = bias[:, g].permute(1, 0, 2)[:, :, None, :]  # [B, H, 1, Lk]
    gamma_map = gamma[:, g].permute(1, 0, 2)[:, :, None, :]  # [B, H, 1, Lk]
    s = (query @ k.transpose(-1, -2)) * scaling * gamma_map + bias_map + attention_mask  # [B, H, Lq, Lk]
    p = torch.softmax(s, dim=-1)
    return (p @ v).transpose(1, 2).contiguous(), p


@pytest.mark.parametrize("side", ["left", "right"])
def test_bias_matches_eager_reference(family, tiny, side):
    model, processor = tiny
    batch = make_batch(processor, side)
    handle = apply(model, processor)
    L, H = handle.num_layers, handle.num_heads
    layers = handle.attention_layers
    handle.revert()
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(L, H, G, generator=gen) * 0.5  # [L, H, G]
    scale = 1 + 0.3 * torch.randn(L, H, G, generator=gen)  # [L, H, G]
    _REF.update(
        groups=token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group,
        tables={layers[i]: (bias[i], scale[i]) for i in range(L)},
    )
    AttentionInterface.register(REF_IMPL, _ref_attention)
    AttentionMaskInterface.register(REF_IMPL, eager_mask)
    ref_model, _ = build_tiny(family, seed=0)
    _text_config(ref_model)._attn_implementation = REF_IMPL
    ref = _logits(ref_model, batch)
    stock = _logits(model, batch)
    handle = apply(model, processor, bias=bias, logit_scale=scale)
    try:
        out = _logits(model, batch)
    finally:
        handle.revert()
    v = _valid(batch)
    assert testing.rel_err(out[v], ref[v]) <= testing.FP32_MODEL_REL
    assert testing.rel_err(out[v], stock[v]) > 100 * testing.FP32_MODEL_REL, "the bias must matter"


def test_generate_matches_stock_and_keeps_cached_groups(tiny):
    model, processor = tiny
    batch = make_batch(processor, "left")
    n_new = 6
    kwargs = dict(
        max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        stock = model.generate(**batch, **kwargs)
    handle = apply(model, processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            ours = model.generate(**batch, **kwargs)
        assert torch.equal(ours.sequences, stock.sequences)
        for s_ours, s_stock in zip(ours.logits, stock.logits):
            assert testing.rel_err(s_ours, s_stock) <= testing.FP32_MODEL_REL
        # Each cached decode step's masses equal those of a teacher-forced forward over the whole sequence.
        steps = rec.steps
        assert len(steps) == n_new
        seq = ours.sequences[:, :-1]  # [B, L0 + n_new - 1]
        B, L0 = batch["input_ids"].shape
        full = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor) and value.shape[:2] == (B, L0) and name != "input_ids":
                fill = 1 if name == "attention_mask" else 0
                extra = torch.full((B, n_new - 1, *value.shape[2:]), fill, dtype=value.dtype)
                full[name] = torch.cat([value, extra], dim=1)
            else:
                full[name] = value
        full["input_ids"] = seq
        with torch.no_grad(), collect_masses(model) as whole:
            model(**full)
        for t in range(1, n_new):
            for layer, (step_mass, full_mass) in enumerate(zip(steps[t], whole.masses)):
                assert step_mass.shape[2] == 1
                err = testing.max_abs_err(step_mass[:, :, 0], full_mass[:, :, L0 + t - 1])
                assert err <= testing.FP32_MASS_ABS, (t, layer, err)
        # A decode step puts mass on exactly the visual, system and user groups its row's prompt has (a family
        # without a default system prompt, Qwen3-VL, has no system keys in a conversation without one).
        prompt_groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group  # [B, L0]
        present = torch.stack([(prompt_groups == g).any(-1) for g in (1, 2, 3)], dim=-1)  # [B, 3]
        assert present.all(-1).any(), "some row must have visual, system and user keys"
        seen = steps[-1][0][:, :, 0, 1:] > 0  # [B, H, 3]
        assert torch.equal(seen, present[:, None, :].expand_as(seen)), "decode steps must see the prompt's groups"
    finally:
        handle.revert()


def test_agto_gradients_match_eager_maps(family, tiny):
    """d(mean image mass over user queries, summed over layers)/d(weights), through the patch and eager maps."""
    model, processor = tiny
    batch = make_batch(processor, "left")
    tg = token_groups(batch["input_ids"], processor, batch["attention_mask"])
    user = tg.user_mask  # [B, L]
    w = user[:, None, :].float()  # [B, 1, L]

    def loss_of(masses):  # masses: per layer [B, H, L, G]
        return sum(((m[..., 1] * w).sum(-1) / w.sum(-1)).mean() for m in masses)

    # The first softmax-attention decoder layer (layer 0 but in hybrid decoders: Qwen3.5's is 3 in 4 linear).
    prefix = f"layers.{attention_layer_indices(model.config)[0]}."
    params = [p for n, p in model.named_parameters() if "language_model" in n and prefix in n]
    assert params
    handle = apply(model, processor)
    try:
        with collect_masses(model) as rec:
            model(**batch)
        ours = torch.autograd.grad(loss_of(rec.masses), params, allow_unused=True)
        layers = handle.attention_layers
    finally:
        handle.revert()
    eager_model, _ = build_tiny(family, seed=0, attn_implementation="eager")
    eager_params = dict(eager_model.named_parameters())
    names = [n for n, p in model.named_parameters() if "language_model" in n and prefix in n]
    out = eager_model(**batch, output_attentions=True)
    onehot = torch.nn.functional.one_hot(tg.key_group.long().clamp(min=0), G).float() * (tg.key_group >= 0)[..., None]
    maps = out.attentions if len(out.attentions) == len(layers) else [out.attentions[i] for i in layers]
    ref = torch.autograd.grad(
        loss_of([a @ onehot[:, None] for a in maps]), [eager_params[n] for n in names], allow_unused=True
    )
    checked = 0
    for name, a, b in zip(names, ours, ref):
        if b is None or not b.abs().max() > 0:
            assert a is None or a.abs().max() == 0, name
            continue
        assert testing.rel_err(a, b) <= testing.FP32_MODEL_REL, name
        checked += 1
    assert checked >= 2, "the loss must reach the weights of the first attention layer"


SENTINELS = {"system": "Kestrelwing", "user": "Walrusfang", "assistant": "Pelicanbeak", "user2": "Marmotden"}


def _token_spans(tokenizer, ids):
    """Character span of every token of `ids` in the text decoded token by token."""
    spans, pos = [], 0
    pieces = [tokenizer.decode([int(i)]) for i in ids]
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans, "".join(pieces)


def test_groups_equal_the_spans_the_template_renders(tiny):
    """Sentinel contents rendered by the family's own template land in the right groups (located in the text)."""
    model, processor = tiny
    s = SENTINELS
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": s["system"]}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["user"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": s["assistant"]}]},
        {"role": "user", "content": [{"type": "text", "text": s["user2"]}]},
    ]
    batch = make_batch(processor, "left", [conversation])
    ids = batch["input_ids"][0]
    tg = token_groups(batch["input_ids"], processor)
    spans, text = _token_spans(processor.tokenizer, ids)
    expected = {"system": 2, "user": 3, "user2": 3}
    for key, word in s.items():
        start = text.index(word)
        inside = [i for i, (a, b) in enumerate(spans) if a < start + len(word) and b > start]
        assert inside, key
        if key == "assistant":
            assert tg.response_mask[0, inside].all() and tg.key_group[0, inside].eq(0).all(), key
        else:
            assert tg.key_group[0, inside].eq(expected[key]).all(), (key, tg.key_group[0, inside].tolist())
    placeholder = set(family_of(model).visual_token_ids(model.config))
    visual = torch.tensor([int(i) in placeholder for i in ids])  # [L]
    assert visual.any()
    assert torch.equal(tg.image_mask[0], visual)
    # Nothing outside a turn's content is user text: the user group is exactly the tokens of user contents.
    user_text = "".join(processor.tokenizer.decode([int(i)]) for i in ids[tg.user_mask[0]])
    assert user_text.replace(" ", "") == (s["user"] + s["user2"]).replace(" ", "")


def test_generation_prompt_response_mask(tiny):
    """In an SFT rendering, the response mask covers the final assistant content (and nothing of the prompt)."""
    model, processor = tiny
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": SENTINELS["assistant"]}]},
    ]
    batch = make_batch(processor, "left", [conversation], generation_prompt=False)
    ids = batch["input_ids"][0]
    tg = token_groups(batch["input_ids"], processor)
    spans, text = _token_spans(processor.tokenizer, ids)
    start = text.index(SENTINELS["assistant"])
    response = [i for i, (a, b) in enumerate(spans) if tg.response_mask[0, i]]
    assert response and spans[response[0]][0] <= start
    content = [i for i, (a, b) in enumerate(spans) if a < start + len(SENTINELS["assistant"]) and b > start]
    assert tg.response_mask[0, content].all()
    assert not (tg.response_mask[0] & (tg.user_mask[0] | tg.image_mask[0])).any()
