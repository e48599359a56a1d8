"""The Qwen2.5-VL patch on the tiny offline model: parity with stock attention, masses, bias, generate, revert.

References are independent of the patch: stock SDPA and eager (transformers' own), eager attention maps for
masses, and a hand-written eager attention function with the bias as an additive mask for the biased runs.
Comparisons are over real (non-padding) query positions; padded queries have no defined output.
"""

import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from avar_ops.core import testing
from avar_ops.hf import token_groups
from avar_ops.hf import apply_to_qwen2_5_vl, collect_masses, get_handle, is_patched, revert
from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl, synthetic_images

G = 4
REF_IMPL = "avar_test_eager_bias"


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    return model, processor


@pytest.fixture(scope="module")
def eager_model():
    model, _ = build_tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    return model


def _messages():
    return [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}],
        [
            {"role": "system", "content": "You are a careful visual reasoning assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare the two images."},
                                         {"type": "image"}]},
            {"role": "assistant", "content": "The first one has more shapes."},
            {"role": "user", "content": "Look back at the image. Are you sure?"},
        ],
    ]


def make_batch(processor, side: str, rows=(0, 1)):
    msgs = [_messages()[i] for i in rows]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    n_images = [sum(1 for turn in m for part in (turn["content"] if isinstance(turn["content"], list) else [])
                    if part.get("type") == "image") for m in msgs]
    images = synthetic_images(sum(n_images), seed=1)
    processor.tokenizer.padding_side = side
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def _valid(batch):
    return batch["attention_mask"].bool()  # [B, L]


@pytest.fixture
def patched(tiny):
    model, processor = tiny
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        yield handle
    finally:
        handle.revert()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits  # [B, L, V]


def _ref_masses(eager_model, batch, groups):
    """Per-layer masses [B, H, L, G] from eager attention maps and the key groups."""
    with torch.no_grad():
        maps = eager_model(**batch, output_attentions=True).attentions  # per layer [B, H, L, L]
    onehot = torch.nn.functional.one_hot(groups.long().clamp(min=0), G).float() * (groups >= 0)[..., None]  # [B, L, G]
    return [a @ onehot[:, None] for a in maps]


@pytest.mark.parametrize("side", ["left", "right"])
def test_zero_bias_logits_match_sdpa(tiny, side):
    model, processor = tiny
    batch = make_batch(processor, side)
    assert not _valid(batch).all(), "the batch must contain padding"
    ref = _logits(model, batch)
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        assert model.config.text_config._attn_implementation == "avar"
        assert model.config.vision_config._attn_implementation == "sdpa"
        out = _logits(model, batch)
    finally:
        handle.revert()
    v = _valid(batch)
    assert torch.isfinite(out[v]).all()
    assert testing.rel_err(out[v], ref[v]) <= testing.FP32_MODEL_REL


@pytest.mark.parametrize("side", ["left", "right"])
def test_masses_match_eager_maps(tiny, eager_model, patched, side):
    model, processor = tiny
    batch = make_batch(processor, side)
    groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group  # [B, L]
    with torch.no_grad(), collect_masses(model) as rec:
        model(**batch)
    ref = _ref_masses(eager_model, batch, groups)
    masses = rec.masses
    assert len(masses) == model.config.text_config.num_hidden_layers
    v = _valid(batch)
    for mass, want in zip(masses, ref):
        assert mass.dtype == torch.float32 and mass.shape == want.shape
        got, want = mass.permute(0, 2, 1, 3)[v], want.permute(0, 2, 1, 3)[v]  # [tokens, H, G]
        assert testing.max_abs_err(got, want) <= testing.FP32_MASS_ABS
        assert testing.max_abs_err(got.sum(-1), torch.ones_like(got.sum(-1))) <= testing.FP32_MASS_ABS
    # Every group is present in this batch, so every mass column is exercised.
    assert set(groups[v].tolist()) == {0, 1, 2, 3}


def test_collect_masses_reduce_and_grad(tiny, patched):
    model, processor = tiny
    batch = make_batch(processor, "left")
    user = token_groups(batch["input_ids"], processor, batch["attention_mask"]).user_mask  # [B, L]

    def per_sample_user_mean(mass):  # [B, H, L, G] -> [B, H, G]
        w = user[:, None, :, None].float()
        return (mass * w).sum(2) / w.sum(2)

    with torch.no_grad(), collect_masses(model) as full, collect_masses(model, reduce=per_sample_user_mean) as red:
        model(**batch)
    for m, r in zip(full.masses, red.masses):
        assert r.shape == (2, model.config.text_config.num_attention_heads, G)
        assert testing.max_abs_err(r, per_sample_user_mean(m)) <= testing.FP32_MASS_ABS
    with torch.enable_grad(), collect_masses(model) as rec:
        model(**batch)
    assert all(m.requires_grad and m.grad_fn is not None for m in rec.masses)
    with torch.no_grad(), collect_masses(model) as rec:
        model(**batch)
        model(**batch)
    assert len(rec.steps) == 2
    with pytest.raises(RuntimeError, match="exactly one forward"):
        rec.masses


def test_generate_matches_stock_and_keeps_cached_groups(tiny, patched):
    model, processor = tiny
    batch = make_batch(processor, "left")
    n_new = 8
    kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    handle = patched
    handle.revert()
    with torch.no_grad():
        stock = model.generate(**batch, **kwargs)
    handle2 = apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            ours = model.generate(**batch, **kwargs)
        assert torch.equal(ours.sequences, stock.sequences)
        for s_ours, s_stock in zip(ours.logits, stock.logits):
            assert testing.rel_err(s_ours, s_stock) <= testing.FP32_MODEL_REL

        # Decoding against the cache must see the prompt's groups: each step's masses equal those of a
        # teacher-forced forward over the whole generated sequence.
        steps = rec.steps
        assert len(steps) == n_new
        seq = ours.sequences[:, :-1]  # [B, L0 + n_new - 1]: every token that was fed to the model
        L0 = batch["input_ids"].shape[1]
        full = dict(batch)
        full["input_ids"] = seq
        full["attention_mask"] = torch.cat(
            [batch["attention_mask"], torch.ones(seq.shape[0], n_new - 1, dtype=torch.long)], dim=1)
        full["mm_token_type_ids"] = torch.cat(
            [batch["mm_token_type_ids"], torch.zeros(seq.shape[0], n_new - 1, dtype=torch.long)], dim=1)
        with torch.no_grad(), collect_masses(model) as whole:
            model(**full)
        for t in range(1, n_new):
            for layer, (step_mass, full_mass) in enumerate(zip(steps[t], whole.masses)):
                assert step_mass.shape[2] == 1
                err = testing.max_abs_err(step_mass[:, :, 0], full_mass[:, :, L0 + t - 1])
                assert err <= testing.FP32_MASS_ABS, (t, layer, err)
        # The decode steps really put mass on visual, system and user keys.
        assert (steps[-1][0][:, :, 0, 1:] > 0).all()
    finally:
        handle2.revert()


# --- a bias against a hand-written eager reference ---------------------------------------------------------

_REF = {}


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with s = scale·q·k·γ[h, g(j)] + β[h, g(j)] + mask; query [B, H, Lq, D]."""
    layer = module.layer_idx
    H, Hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    v = value.repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    g = _REF["groups"].long().clamp(min=0)  # [B, Lk]
    bias = _REF["bias"][layer].expand(H, G)  # [H, G]
    gamma = _REF["logit_scale"][layer].expand(H, G)  # [H, G]
    bias_map = bias[:, g].permute(1, 0, 2)[:, :, None, :]  # [B, H, 1, Lk]
    gamma_map = gamma[:, g].permute(1, 0, 2)[:, :, None, :]  # [B, H, 1, Lk]
    s = (query @ k.transpose(-1, -2)) * scaling * gamma_map + bias_map + attention_mask  # [B, H, Lq, Lk]
    p = torch.softmax(s, dim=-1)
    return (p @ v).transpose(1, 2).contiguous(), p


@pytest.fixture(scope="module")
def ref_model():
    AttentionInterface.register(REF_IMPL, _ref_attention)
    AttentionMaskInterface.register(REF_IMPL, eager_mask)
    model, _ = build_tiny_qwen2_5_vl(seed=0)
    model.config.text_config._attn_implementation = REF_IMPL
    return model


def _tables(num_layers, H, seed, layers, kind):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bias":
        table = torch.randn(num_layers, H, G, generator=gen) * 0.5  # [layers, H, G]
        neutral = torch.zeros(H, G)
    else:
        table = 1 + 0.3 * torch.randn(num_layers, H, G, generator=gen)  # [layers, H, G]
        neutral = torch.ones(H, G)
    per_layer = [table[i] if (layers is None or i in layers) else neutral for i in range(num_layers)]
    return table, per_layer


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("what", ["bias_all_layers", "bias_layer_1", "bias_per_group", "logit_scale_and_bias"])
def test_bias_matches_eager_reference(tiny, ref_model, side, what):
    model, processor = tiny
    cfg = model.config.text_config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    batch = make_batch(processor, side)
    layers = [1] if what == "bias_layer_1" else None
    bias, ref_bias = _tables(L, H, 1, layers, "bias")
    scale, ref_scale = None, [torch.ones(H, G)] * L
    if what == "bias_per_group":  # the paper's reading: log(1 + α_img) on visual keys, log(1 − α_sys) on system
        bias = torch.tensor([0.0, 0.8, -1.2, 0.0])
        ref_bias = [bias] * L
    if what == "logit_scale_and_bias":
        scale, ref_scale = _tables(L, H, 2, None, "scale")
    _REF.update(groups=token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group,
                bias=ref_bias, logit_scale=ref_scale)
    ref = _logits(ref_model, batch)
    stock = _logits(model, batch)
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=bias, logit_scale=scale, layers=layers)
    try:
        out = _logits(model, batch)
    finally:
        handle.revert()
    v = _valid(batch)
    assert testing.rel_err(out[v], ref[v]) <= testing.FP32_MODEL_REL
    # The bias matters far beyond the tolerance, so the comparison above can tell a bias from none.
    assert testing.rel_err(out[v], stock[v]) > 100 * testing.FP32_MODEL_REL


def test_small_bias_is_detected(tiny, patched):
    """A bias of 0.01 on visual keys moves the logits well past FP32_MODEL_REL (the tolerance's argument)."""
    model, processor = tiny
    batch = make_batch(processor, "left")
    base = _logits(model, batch)
    patched.set_bias(torch.tensor([0.0, 0.01, 0.0, 0.0]))
    moved = _logits(model, batch)
    v = _valid(batch)
    assert testing.rel_err(moved[v], base[v]) > 10 * testing.FP32_MODEL_REL


def test_explicit_groups_equal_tokenizer_groups(tiny):
    model, processor = tiny
    batch = make_batch(processor, "left")
    bias = torch.tensor([0.0, 0.5, -0.5, 0.2])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=bias)
    try:
        want = _logits(model, batch)
        with torch.no_grad():
            want_gen = model.generate(**batch, **gen)
    finally:
        handle.revert()
    handle = apply_to_qwen2_5_vl(model, bias=bias)
    try:
        with pytest.raises(RuntimeError, match="no token groups"):
            _logits(model, batch)
        groups = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group
        handle.set_key_groups(groups)
        got = _logits(model, batch)
        # Generated positions past the explicit groups are group 0, as the tokenizer gives them.
        with torch.no_grad():
            got_gen = model.generate(**batch, **gen)
    finally:
        handle.revert()
    v = _valid(batch)
    assert torch.equal(got[v], want[v])
    assert torch.equal(got_gen.sequences, want_gen.sequences)
    for a, b in zip(got_gen.logits, want_gen.logits):
        assert torch.equal(a, b)


def test_single_sequence_without_padding(tiny, patched):
    model, processor = tiny
    batch = make_batch(processor, "left", rows=(1,))
    assert _valid(batch).all()
    out = _logits(model, batch)
    patched.revert()
    ref = _logits(model, batch)
    assert testing.rel_err(out, ref) <= testing.FP32_MODEL_REL


def test_revert_restores_stock(tiny):
    model, processor = tiny
    batch = make_batch(processor, "left")
    before = _logits(model, batch)
    base = model.model
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=torch.tensor([0.0, 2.0, -2.0, 0.0]))
    biased = _logits(model, batch)
    with pytest.raises(RuntimeError, match="already patched"):
        apply_to_qwen2_5_vl(model, tokenizer=processor)
    revert(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not base._forward_pre_hooks
    assert not any(hasattr(layer.self_attn, "_avar_state") for layer in base.language_model.layers)
    after = _logits(model, batch)
    assert torch.equal(after, before)
    v = _valid(batch)
    assert testing.rel_err(biased[v], before[v]) > 100 * testing.FP32_MODEL_REL
    with pytest.raises(RuntimeError, match="not patched"):
        with collect_masses(model):
            pass
    with pytest.raises(RuntimeError, match="not patched"):
        revert(model)
    handle.revert()  # a second revert through the handle is a no-op
    with pytest.raises(RuntimeError, match="reverted"):
        handle.set_bias(None)


def test_handle_lookup_and_tables(tiny):
    model, processor = tiny
    H = model.config.text_config.num_attention_heads
    assert get_handle(model) is None and not is_patched(model) and not is_patched(torch.nn.Linear(2, 2))
    per_head = torch.randn(H, G)  # [H, G]
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=per_head, layers=[1])
    try:
        assert get_handle(model) is handle and get_handle(model.model) is handle and is_patched(model)
        bias, gamma = handle.tables(1)
        assert torch.equal(bias, per_head) and torch.equal(gamma, torch.ones(H, G))
        bias[0, 0] = 7.0  # a copy: the layer keeps its table
        assert torch.equal(handle.tables(1)[0], per_head)
        bias0, gamma0 = handle.tables(0)  # outside `layers`: the identity
        assert torch.equal(bias0, torch.zeros(H, G)) and torch.equal(gamma0, torch.ones(H, G))
        handle.set_bias(logit_scale=torch.tensor([1.0, 2.0, 0.5, 1.0]))  # [G] expands over heads
        bias, gamma = handle.tables(2)
        assert torch.equal(bias, torch.zeros(H, G))
        assert torch.equal(gamma, torch.tensor([1.0, 2.0, 0.5, 1.0]).expand(H, G))
        with pytest.raises(ValueError, match="layer: index 3 is out of range for 3"):
            handle.tables(3)
        with pytest.raises(TypeError, match="layer must be an int"):
            handle.tables(1.0)
    finally:
        revert(model)
    assert get_handle(model) is None and not is_patched(model.model)
    with pytest.raises(RuntimeError, match="reverted"):
        handle.tables(0)


@pytest.mark.parametrize("version", ["4.57.1", "5.16.0", "6.0.0", "6.1.0.dev0"])
def test_version_check_raises(tiny, monkeypatch, version):
    model, processor = tiny
    # Building the processor can replace the lazy `transformers` module in sys.modules; patch the live one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(RuntimeError, match=r">=5\.17,<6.*" + version.replace(".", r"\.")):
        apply_to_qwen2_5_vl(model, tokenizer=processor)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not hasattr(model, "_avar_state")


def test_wrong_model_raises(tiny):
    _, processor = tiny
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel, got Qwen2ForCausalLM"):
        apply_to_qwen2_5_vl(transformers.Qwen2ForCausalLM(cfg), tokenizer=processor)
    with pytest.raises(TypeError, match="got Linear"):
        apply_to_qwen2_5_vl(torch.nn.Linear(2, 2))


def test_bad_tables_raise(tiny):
    model, processor = tiny
    cfg = model.config.text_config
    with pytest.raises(ValueError, match=r"bias must have shape \[4\], \[4, 4\] or \[3, 4, 4\].*got \(5,\)"):
        apply_to_qwen2_5_vl(model, bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"logit_scale must have shape.*got \(2, 4\)"):
        apply_to_qwen2_5_vl(model, logit_scale=torch.ones(2, G))
    with pytest.raises(ValueError, match="bias must be finite"):
        apply_to_qwen2_5_vl(model, bias=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="layers: index 7 is out of range for 3"):
        apply_to_qwen2_5_vl(model, bias=torch.zeros(G), layers=[0, 7])
    assert cfg._attn_implementation == "sdpa" and not hasattr(model, "_avar_state")


def test_unsupported_inputs_raise(tiny, patched):
    model, processor = tiny
    batch = make_batch(processor, "left")
    with pytest.raises(NotImplementedError, match="does not return attention maps"):
        model(**batch, output_attentions=True)
    with pytest.raises(NotImplementedError, match="masks prepared in advance"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")
    # Packed sequences: positions restart inside the row and there is no attention mask.
    ids = processor.tokenizer(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>user\nyes<|im_end|>"],
                              return_tensors="pt")["input_ids"]  # [1, L]
    L = ids.shape[1]
    pos = torch.cat([torch.arange(6), torch.arange(L - 6)])[None, None].expand(4, 1, L)  # [4, 1, L]
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=pos, use_cache=False)


def test_cache_filled_before_patch_raises(tiny):
    """A cache the patch did not see being filled has no groups; continuing from it must not guess."""
    model, processor = tiny
    batch = make_batch(processor, "left")
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        nxt = torch.full((2, 1), 5)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        with pytest.raises(RuntimeError, match="cannot be grouped"):
            model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
    finally:
        handle.revert()
