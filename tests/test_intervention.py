"""The intervention's readings give exactly the attention they claim, on random tensors and through the model.

Each reading is checked against an independent, hand-made definition of its attention map in float64
(scaled-and-renormalised eager weights, softmax with a scaled or shifted logit), both through the float64
reference op and through the CPU kernel.
"""

import math

import pytest
import torch

import avar_ops
from avar_ops.core import testing
from avar_ops.hf import is_patched
from avar_ops.method import Intervention, reweight_probabilities

B, LQ, H, HKV, D = 2, 24, 4, 2, 16


def _random_inputs(seed=0, causal_len=LQ):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, causal_len, H, D, generator=gen, dtype=torch.float64)  # [B, L, H, D]
    k = torch.randn(B, causal_len, HKV, D, generator=gen, dtype=torch.float64)  # [B, L, Hkv, D]
    v = torch.randn(B, causal_len, HKV, D, generator=gen, dtype=torch.float64)  # [B, L, Hkv, D]
    # A chat-like layout: system span, then visual tokens inside user text, then template tokens.
    layout = [0] + [2] * 5 + [0] + [3] * 2 + [1] * 8 + [3] * 5 + [0] * (causal_len - 22)
    key_group = torch.tensor(layout[:causal_len], dtype=torch.int8).repeat(B, 1)  # [B, L]
    key_group[1, :2] = -1  # left padding on the second sample
    return q, k, v, key_group


def _plain_scores(q, k, key_group):
    """scale·QKᵀ [B, H, L, L] in float64, with −inf where the key is hidden (causal or padding)."""
    qh = q.transpose(1, 2)  # [B, H, L, D]
    kh = k.transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # [B, H, L, D]
    s = (qh @ kh.transpose(-1, -2)) * D**-0.5  # [B, H, L, L]
    L = q.shape[1]
    hidden = torch.ones(L, L, dtype=torch.bool).triu(1)[None, None] | (key_group < 0)[:, None, None, :]
    return s, hidden


def _softmax_rows(s, hidden):
    s = s.masked_fill(hidden, float("-inf"))
    alive = ~hidden.all(dim=-1, keepdim=True)
    return torch.where(alive, torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1), torch.zeros_like(s))


def _group_masses(p, key_group):
    onehot = torch.nn.functional.one_hot(key_group.long().clamp(min=0), 4).to(p.dtype)  # [B, L, G]
    onehot = onehot * (key_group >= 0)[..., None].to(p.dtype)
    return p @ onehot[:, None]  # [B, H, L, G]


def _layer(tables, layer):
    bias = None if tables.bias is None else tables.bias[layer]
    gamma = None if tables.logit_scale is None else tables.logit_scale[layer]
    return bias, gamma


def _check_against(p_expected, q, k, v, key_group, iv, layer=0, num_layers=1):
    """The reference (float64 tables) and the kernel (the float32 tables the patch uses) reproduce the map."""
    vh = v.transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # [B, H, L, D]
    out_expected = (p_expected @ vh).transpose(1, 2)  # [B, L, H, D]
    mass_expected = _group_masses(p_expected, key_group)  # [B, H, L, G]

    bias, gamma = _layer(iv.tables(num_layers, H, dtype=torch.float64), layer)
    ref = avar_ops.attention_reference(q, k, v, key_group, bias, logit_scale=gamma, return_mass=True)
    assert testing.rel_err(ref.out, out_expected) <= testing.FP64_OUT_REL
    assert testing.rel_err(ref.mass, mass_expected) <= testing.FP64_OUT_REL

    bias, gamma = _layer(iv.tables(num_layers, H), layer)
    got = avar_ops.attention(q.float(), k.float(), v.float(), key_group, bias, logit_scale=gamma, return_mass=True)
    assert testing.rel_err(got.out, out_expected) <= testing.FP32_OUT_REL
    assert testing.max_abs_err(got.mass, mass_expected) <= testing.FP32_MASS_ABS


def test_weights_reading_is_renormalised_reweighting_of_eager_weights():
    q, k, v, kg = _random_inputs(seed=1)
    iv = Intervention(mode="weights", alpha_img=0.15, alpha_sys=0.3)
    s, hidden = _plain_scores(q, k, kg)
    eager = _softmax_rows(s, hidden)  # [B, H, L, L]
    expected = reweight_probabilities(eager, kg[:, None, None, :].long(), 0.15, 0.3)
    # The reweighting really moves attention (otherwise the test would prove nothing).
    assert testing.max_abs_err(expected, eager) > 100 * testing.FP32_MASS_ABS
    _check_against(expected, q, k, v, kg, iv)


def test_logits_reading_scales_image_and_system_logits():
    q, k, v, kg = _random_inputs(seed=2)
    iv = Intervention(mode="logits", alpha_img=0.5, alpha_sys=0.4)
    s, hidden = _plain_scores(q, k, kg)
    factor = torch.ones_like(kg, dtype=torch.float64)  # [B, L]
    factor[kg == 1] = 1.5
    factor[kg == 2] = 0.6
    expected = _softmax_rows(s * factor[:, None, None, :], hidden)
    assert testing.max_abs_err(expected, _softmax_rows(s, hidden)) > 100 * testing.FP32_MASS_ABS
    assert iv.tables(1, H).bias is None
    _check_against(expected, q, k, v, kg, iv)


def test_bias_reading_adds_beta_times_visual_mask():
    q, k, v, kg = _random_inputs(seed=3)
    iv = Intervention(mode="bias", beta_img=0.7, beta_sys=-0.5)
    s, hidden = _plain_scores(q, k, kg)
    visual = (kg == 1).to(torch.float64)[:, None, None, :]  # [B, 1, 1, L]
    system = (kg == 2).to(torch.float64)[:, None, None, :]
    expected = _softmax_rows(s + 0.7 * visual - 0.5 * system, hidden)
    assert iv.tables(1, H).logit_scale is None
    _check_against(expected, q, k, v, kg, iv)


def test_selected_heads_only():
    q, k, v, kg = _random_inputs(seed=4)
    iv = Intervention(mode="weights", alpha_img=0.4, alpha_sys=0.2, heads=(1, 3))
    s, hidden = _plain_scores(q, k, kg)
    eager = _softmax_rows(s, hidden)
    expected = eager.clone()
    for h in (1, 3):
        expected[:, h] = reweight_probabilities(eager[:, h], kg[:, None, :].long(), 0.4, 0.2)
    _check_against(expected, q, k, v, kg, iv)


def test_selected_layers_tables_are_identity_elsewhere():
    iv = Intervention(mode="logits", alpha_img=0.15, alpha_sys=0.2, layers=(0, 2))
    t = iv.tables(4, H)
    assert t.layers == (0, 2)
    assert torch.equal(t.logit_scale[1], torch.ones(H, 4)) and torch.equal(t.logit_scale[3], torch.ones(H, 4))
    assert t.logit_scale[0, :, 1].eq(torch.tensor(1.15, dtype=torch.float32)).all()
    assert t.logit_scale[2, :, 2].eq(torch.tensor(0.8, dtype=torch.float32)).all()
    w = Intervention(mode="weights", alpha_img=0.15, alpha_sys=0.2).tables(3, H)
    assert torch.allclose(w.bias[:, :, 1], torch.full((3, H), math.log(1.15)))
    assert torch.allclose(w.bias[:, :, 2], torch.full((3, H), math.log(0.8)))
    assert torch.equal(w.bias[:, :, 0], torch.zeros(3, H)) and torch.equal(w.bias[:, :, 3], torch.zeros(3, H))


def test_identity_intervention_has_no_tables():
    t = Intervention(mode="weights").tables(2, H)
    assert t.bias is None and t.logit_scale is None and t.layers == ()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="weights", alpha_sys=1.0), "alpha_sys < 1"),
        (dict(mode="logits", alpha_sys=1.5), "alpha_sys < 1"),
        (dict(mode="weights", alpha_img=-1.0), "alpha_img > -1"),
        (dict(mode="softmax"), "mode"),
        (dict(mode="bias", alpha_img=0.1), "beta_img"),
        (dict(mode="weights", beta_img=0.1), "alpha_img"),
        (dict(mode="weights", alpha_img=float("nan")), "finite"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Intervention(**kwargs)


def test_bad_layer_and_head_indices_are_rejected():
    with pytest.raises(ValueError, match="Intervention.layers: index 5 is out of range for 4"):
        Intervention(alpha_img=0.1, layers=(5,)).tables(4, H)
    with pytest.raises(ValueError, match=f"Intervention.heads: index {-H - 1} is out of range for {H}"):
        Intervention(alpha_img=0.1, heads=(-H - 1,)).tables(4, H)
    with pytest.raises(TypeError, match="expected ints"):
        Intervention(alpha_img=0.1, heads=(0.5,)).tables(4, H)


# ------------------------------------------------------------------------------------------ through the model


@pytest.fixture(scope="module")
def tiny():
    from tiny_eager import tiny_eager

    return tiny_eager()


@pytest.fixture(scope="module")
def sample():
    from tiny_eager import tiny_samples

    return tiny_samples()[1]  # two images and its own system prompt


def _layer_masses(model, processor, sample, iv):
    from avar_ops.data.samples import build_inputs
    from avar_ops.hf import collect_masses
    from avar_ops.method import intervened

    inputs = build_inputs(processor, [sample])
    with intervened(model, processor, iv), torch.no_grad(), collect_masses(model) as rec:
        model(**inputs)
    return [m.double() for m in rec.masses]  # per layer [1, H, L, G]


@pytest.mark.parametrize(
    "iv, img_factor, sys_factor, heads",
    [
        (Intervention(mode="weights", alpha_img=0.15, alpha_sys=0.2), 1.15, 0.8, None),
        (Intervention(mode="weights", alpha_img=0.5, alpha_sys=0.4, heads=(1, 2)), 1.5, 0.6, (1, 2)),
        (Intervention(mode="bias", beta_img=0.5, beta_sys=-0.7), math.exp(0.5), math.exp(-0.7), None),
    ],
    ids=["weights", "weights-heads", "bias"],
)
def test_model_layer0_is_reweighted_eager_map(tiny, sample, iv, img_factor, sys_factor, heads):
    """Layer 0 sees the same inputs with and without the intervention, so its attention under the intervention
    is exactly the stock eager map of layer 0 with image / system columns scaled and rows renormalised."""
    from tiny_eager import eager_maps, masses_from_maps

    model, processor = tiny
    maps, groups, _ = eager_maps(model, processor, sample)
    kg = groups.key_group[:, None, None, :].long()  # [1, 1, 1, L]
    reweighted = reweight_probabilities(maps[0], kg, img_factor - 1.0, 1.0 - sys_factor)  # [1, H, L, L]
    if heads is not None:
        keep = torch.ones(maps[0].shape[1], dtype=torch.bool)
        keep[list(heads)] = False
        reweighted[:, keep] = maps[0][:, keep]
    expected = masses_from_maps([reweighted], groups.key_group)[0]  # [1, H, L, G]
    got = _layer_masses(model, processor, sample, iv)[0]
    valid = groups.key_group[0] >= 0
    assert testing.max_abs_err(got[..., valid, :], expected[..., valid, :]) <= testing.FP32_MASS_ABS
    plain = masses_from_maps([maps[0]], groups.key_group)[0]
    assert testing.max_abs_err(expected, plain) > 100 * testing.FP32_MASS_ABS  # the intervention shows


def test_model_logits_reading_matches_reference_on_layer_inputs(tiny, sample):
    """The logits reading inside the model: layer 1's masses equal the float64 reference run on the q and k that
    layer's attention received (captured through the patch) with the logit-scale table."""
    from avar_ops.data.samples import build_inputs
    from avar_ops.hf import capture_attention, collect_masses
    from avar_ops.method import intervened

    model, processor = tiny
    iv = Intervention(mode="logits", alpha_img=0.3, alpha_sys=0.3, layers=(1,))
    inputs = build_inputs(processor, [sample])
    with intervened(model, processor, iv), torch.no_grad():
        with capture_attention(model, [1]) as cap, collect_masses(model) as rec:
            model(**inputs)
    c = cap.inputs[1]
    q, k = c.query, c.key  # [1, L, H, D], [1, L, H_kv, D]
    v = torch.randn_like(k)  # masses do not depend on v
    gamma = iv.tables(3, H, dtype=torch.float64).logit_scale[1]
    ref = avar_ops.attention_reference(q, k, v, c.key_group, logit_scale=gamma, scale=c.scale, return_mass=True)
    plain = avar_ops.attention_reference(q, k, v, c.key_group, scale=c.scale, return_mass=True)
    assert testing.max_abs_err(rec.masses[1], ref.mass) <= testing.FP32_MASS_ABS
    assert testing.max_abs_err(ref.mass, plain.mass) > 100 * testing.FP32_MASS_ABS


def test_every_decode_step_gets_the_intervention(tiny, sample):
    """Masses of each generated token, taken during generate() (KV cache, one query per step), equal those of
    one full forward over the final sequence under the same intervention, and differ from the plain ones."""
    from avar_ops.data.samples import build_inputs
    from avar_ops.hf import collect_masses
    from avar_ops.method import intervened

    model, processor = tiny
    iv = Intervention(mode="weights", alpha_img=0.4, alpha_sys=0.3)
    inputs = build_inputs(processor, [sample])
    P = inputs["input_ids"].shape[1]
    with intervened(model, processor, iv), torch.no_grad(), collect_masses(model) as rec:
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    steps = rec.steps
    assert len(steps) == 6  # the prefill and five decode steps (the sixth token is not fed back)
    full_inputs = {
        **inputs,
        "input_ids": out[:, :-1],
        "attention_mask": torch.ones_like(out[:, :-1]),
        "mm_token_type_ids": torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 5)),
    }

    def full_masses(intervention):
        with intervened(model, processor, intervention), torch.no_grad(), collect_masses(model) as full:
            model(**full_inputs)
        return full.masses

    with_iv, without = full_masses(iv), full_masses(None)
    for layer in range(len(steps[0])):
        decode = torch.cat([steps[t][layer] for t in range(1, 6)], dim=2)  # [1, H, 5, G]
        assert testing.max_abs_err(decode, with_iv[layer][:, :, P:]) <= testing.FP32_MASS_ABS
        assert testing.max_abs_err(steps[0][layer], with_iv[layer][:, :, :P]) <= testing.FP32_MASS_ABS
        assert testing.max_abs_err(decode, without[layer][:, :, P:]) > 100 * testing.FP32_MASS_ABS


def test_generate_without_intervention_is_stock_generate(tiny, sample):
    from avar_ops.analysis import generate_answers
    from avar_ops.data import build_inputs

    model, processor = tiny
    inputs = build_inputs(processor, [sample])
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    ours = generate_answers(model, processor, [sample], max_new_tokens=6)[0]
    assert ours["tokens"] == stock.tolist()[: len(ours["tokens"])]
    assert not is_patched(model)


def test_patched_refuses_second_intervention(tiny):
    from avar_ops.method import intervened

    model, processor = tiny
    with intervened(model, processor, Intervention(alpha_img=0.1)):
        with pytest.raises(RuntimeError, match="already patched"):
            with intervened(model, processor, Intervention(alpha_img=0.2)):
                pass
    assert not is_patched(model)
