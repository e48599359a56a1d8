"""Steering files and learned tables on the patched tiny Qwen2.5-VL: the gradients of the bias / logit-scale
tables equal those of an eager attention that applies the same tables, save → load gives bit-identical logits,
a steering file acts at decode exactly as in a prefill of the whole sequence, and bad files are refused in one
line that names what was expected and what came."""

import json
import os

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl, synthetic_images
from avar_ops.core import Group, testing
from avar_ops.hf import (
    Steering,
    SteeringError,
    apply_to_qwen2_5_vl,
    collect_masses,
    load_steering,
    model_steering_shape,
    save_steering,
    token_groups,
)
from avar_ops.method import generate, intervened, patch_tables

G = 4
EAGER_IMPL = "avar_test_steering_eager"
_EAGER = {}  # groups [B, L], bias / logit_scale [L, H, G] of the eager reference
SEEDS = (0, 1, 2)


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with s = scale·q·k·γ[h, g(j)] + β[h, g(j)] + mask, differentiable in γ and β;
    query [B, H, Lq, D], key / value [B, H_kv, Lk, D]."""
    layer = module.layer_idx
    H, Hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    v = value.repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    g = _EAGER["groups"].long().clamp(min=0)  # [B, Lk]
    bias = _EAGER["bias"][layer]  # [H, G]
    gamma = _EAGER["logit_scale"][layer]  # [H, G]
    bias_map = bias[:, g].permute(1, 0, 2)[:, :, None, :]  # [B, H, 1, Lk]
    gamma_map = gamma[:, g].permute(1, 0, 2)[:, :, None, :]  # [B, H, 1, Lk]
    s = (query @ k.transpose(-1, -2)) * scaling * gamma_map + bias_map + attention_mask  # [B, H, Lq, Lk]
    p = torch.softmax(s, dim=-1)  # [B, H, Lq, Lk]
    return (p @ v).transpose(1, 2).contiguous(), p


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen2_5_vl(seed=0)


@pytest.fixture(scope="module")
def eager_model():
    AttentionInterface.register(EAGER_IMPL, _eager_attention)
    AttentionMaskInterface.register(EAGER_IMPL, eager_mask)
    model, _ = build_tiny_qwen2_5_vl(seed=0)
    model.config.text_config._attn_implementation = EAGER_IMPL
    return model


def _batch(processor, side="right"):
    msgs = [
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
        ],
        [
            {"role": "system", "content": "You are a careful visual reasoning assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the circles here."}]},
            {"role": "assistant", "content": "There are two."},
            {"role": "user", "content": "Look again. Are you sure?"},
        ],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    processor.tokenizer.padding_side = side
    return processor(text=texts, images=synthetic_images(2, seed=3), return_tensors="pt", padding=True)


def _random_tables(shape, seed):
    """(bias, logit_scale) [L, H, G]: entries of the size a few hundred steering steps reach."""
    gen = torch.Generator().manual_seed(seed)
    L, H = shape["num_layers"], shape["num_heads"]
    bias = 0.7 * torch.randn(L, H, G, generator=gen)
    scale = 1 + 0.3 * torch.randn(L, H, G, generator=gen)
    return bias, scale


def _labels(batch):
    """Targets on the tokens that follow a real token: the first token after left padding would be predicted
    from a padded row, whose output no attention defines (the op gives 0, eager a mean of the values)."""
    valid = batch["attention_mask"].bool()  # [B, L]
    after_valid = torch.nn.functional.pad(valid[:, :-1], (1, 0), value=False)  # [B, L]
    return batch["input_ids"].masked_fill(~(valid & after_valid), -100)


def _objective(out, masses, user_mask):
    """L_LM + the user tokens' mean image mass, averaged over layers: the tables reach it through the output and
    through the masses."""
    user = user_mask.float()  # [B, L]
    image = torch.stack([(m[..., Group.VISUAL].mean(1) * user).sum() / user.sum() for m in masses])
    return out.loss + image.mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_table_gradients_match_eager_attention(tiny, eager_model, seed):
    """d(L_LM + image mass)/dβ and /dγ through the fused op equal those through eager attention maps."""
    model, processor = tiny
    eager_model.load_state_dict(model.state_dict())
    batch = _batch(processor, side=("right", "left", "right")[seed])
    shape = model_steering_shape(model)
    bias0, scale0 = _random_tables(shape, seed)
    found = token_groups(batch["input_ids"], processor, batch["attention_mask"])
    groups = found.key_group  # [B, L]

    bias, scale = bias0.clone().requires_grad_(), scale0.clone().requires_grad_()
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=bias, logit_scale=scale)
    try:
        with collect_masses(model) as rec:
            out = model(**batch, labels=_labels(batch), use_cache=False)
        ours = torch.autograd.grad(_objective(out, rec.masses, found.user_mask), [bias, scale])
    finally:
        handle.revert()

    ref_bias, ref_scale = bias0.clone().requires_grad_(), scale0.clone().requires_grad_()
    _EAGER.update(groups=groups, bias=ref_bias, logit_scale=ref_scale)
    onehot = torch.nn.functional.one_hot(groups.long().clamp(min=0), G).float() * (groups >= 0)[..., None]  # [B,L,G]
    out = eager_model(**batch, labels=_labels(batch), use_cache=False, output_attentions=True)
    masses = [a @ onehot[:, None] for a in out.attentions]  # per layer [B, H, L, G]
    ref = torch.autograd.grad(_objective(out, masses, found.user_mask), [ref_bias, ref_scale])
    for got, want in zip(ours, ref):
        assert want.abs().max() > 0
        assert testing.rel_err(got, want) <= testing.FP32_MODEL_GRAD_REL


def test_save_load_gives_identical_logits(tiny, tmp_path):
    """A steering file carries the tables exactly: logits with the loaded file equal those with the tables."""
    model, processor = tiny
    batch = _batch(processor)
    shape = model_steering_shape(model)
    for seed in SEEDS:
        bias, scale = _random_tables(shape, seed)
        path = str(tmp_path / f"s{seed}.safetensors")
        save_steering(path, bias, scale, trained={"seed": seed}, **shape)
        handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=bias, logit_scale=scale)
        try:
            with torch.no_grad():
                direct = model(**batch).logits  # [B, L, V]
                handle.clear_steering()
                plain = model(**batch).logits
                loaded = handle.load_steering(path)
                again = model(**batch).logits
        finally:
            handle.revert()
        assert torch.equal(direct, again)
        assert not torch.allclose(direct, plain)  # the tables act
        assert loaded.trained == {"seed": seed} and loaded.model_type == "qwen2_5_vl"
        assert torch.equal(loaded.bias, bias) and torch.equal(loaded.logit_scale, scale)
        # the same tables through the intervention path (--steer): patch_tables hands them over unchanged
        with intervened(model, processor, loaded), torch.no_grad():
            assert torch.equal(model(**batch).logits, direct)


def test_file_records_what_it_was_made_for(tiny, tmp_path):
    model, _ = tiny
    shape = model_steering_shape(model)
    bias, scale = _random_tables(shape, 0)
    path = str(tmp_path / "s.safetensors")
    save_steering(path, bias, scale, trained={"max_steps": 5}, **shape)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["avar_steering"])
        assert sorted(f.keys()) == ["bias", "logit_scale"]
    assert meta["format"] == "avar-steering" and meta["groups"] == ["other", "visual", "system", "user"]
    assert (meta["num_layers"], meta["num_heads"]) == (shape["num_layers"], shape["num_heads"])
    assert meta["attention_layers"] == list(range(shape["num_layers"])) and meta["trained"] == {"max_steps": 5}
    assert meta["avar_version"] and (meta["commit"] is None or len(meta["commit"]) == 40)
    assert not os.path.exists(path + ".partial")


@pytest.mark.parametrize("seed", SEEDS)
def test_steering_at_decode_matches_prefill(tiny, seed):
    """Greedy tokens under a steering file, generated with the KV cache (decode steps), are the argmax of a
    prefill of prompt + tokens so far, and the step's logits equal the prefill's last row."""
    model, processor = tiny
    batch = _batch(processor, side="left")
    shape = model_steering_shape(model)
    bias, scale = _random_tables(shape, 10 + seed)
    steering = Steering(
        bias=bias,
        logit_scale=scale,
        attention_layers=tuple(range(shape["num_layers"])),
        **{k: v for k, v in shape.items() if k != "attention_layers"},
    )
    with intervened(model, processor, steering), torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        prompt = batch["input_ids"].shape[1]
        for t, scores in enumerate(out.scores):
            ids = out.sequences[:, : prompt + t]  # [B, P + t]
            mask = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], t, dtype=torch.long)], dim=1)
            grown = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
            if "mm_token_type_ids" in batch:  # generated tokens are text
                grown["mm_token_type_ids"] = torch.nn.functional.pad(batch["mm_token_type_ids"], (0, t))
            inputs = {**grown, "input_ids": ids, "attention_mask": mask}
            full = model(**inputs, use_cache=False).logits[:, -1]  # [B, V]
            assert testing.rel_err(scores, full) <= testing.FP32_MODEL_REL
            assert torch.equal(full.argmax(-1), out.sequences[:, prompt + t])
    # and the steering changed what was generated somewhere, or the test would not see the tables at decode
    plain = generate(model, processor, batch, max_new_tokens=5)
    steered = generate(model, processor, batch, intervention=steering, max_new_tokens=5)
    assert plain != steered


# ------------------------------------------------------------------------------------------------ bad files


def _write(tmp_path, name="s.safetensors", meta=None, tensors=None, shape=None):
    from safetensors.torch import save_file

    shape = shape or {"model_type": "qwen2_5_vl", "num_layers": 3, "num_heads": 4, "attention_layers": [0, 1, 2]}
    L, H = len(shape["attention_layers"]), shape["num_heads"]
    base = {
        "format": "avar-steering",
        "version": 1,
        "groups": ["other", "visual", "system", "user"],
        "trained": {},
        "commit": None,
        "avar_version": "0",
        **shape,
    }
    base.update(meta or {})
    t = {"bias": torch.zeros(L, H, G), "logit_scale": torch.ones(L, H, G)}
    t.update(tensors or {})
    path = str(tmp_path / name)
    save_file(t, path, metadata={"avar_steering": json.dumps(base)})
    return path


@pytest.mark.parametrize(
    "meta, tensors, expected",
    [
        ({"format": "other"}, None, "metadata format must be 'avar-steering', got 'other'"),
        ({"version": 7}, None, "steering format version 7; this avar reads version 1"),
        ({"groups": ["a", "b"]}, None, "groups must be ['other', 'visual', 'system', 'user']"),
        ({"num_heads": 0}, None, "metadata num_heads must be a positive integer, got 0"),
        ({"attention_layers": [2, 1]}, None, "attention_layers must be increasing decoder indices in [0, 3)"),
        ({"attention_layers": [0, 1, 3]}, None, "attention_layers must be increasing decoder indices in [0, 3)"),
        (
            None,
            {"bias": torch.zeros(2, 4, G)},
            "bias must be [3, 4, 4] (attention layers, heads, groups), got [2, 4, 4]",
        ),
        (None, {"logit_scale": torch.full((3, 4, G), float("nan"))}, "logit_scale[0, 0, 0] = nan; entries must be"),
        (None, {"bias": torch.full((3, 4, G), 2e4)}, "bias[0, 0, 0] = 20000; entries must be finite and at most"),
    ],
)
def test_malformed_files_are_refused_in_one_line(tmp_path, meta, tensors, expected):
    path = _write(tmp_path, meta=meta, tensors=tensors)
    with pytest.raises(SteeringError) as err:
        load_steering(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_files_that_are_not_steering_files(tmp_path):
    from safetensors.torch import save_file

    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    plain = str(tmp_path / "plain.safetensors")
    save_file({"bias": torch.zeros(3, 4, G)}, plain)
    missing = _write(tmp_path, name="half.safetensors")
    from safetensors.torch import load_file

    half = load_file(missing)
    del half["logit_scale"]
    from safetensors import safe_open

    with safe_open(missing, framework="pt") as f:
        meta = f.metadata()
    save_file(half, missing, metadata=meta)
    cases = [
        (str(tmp_path / "absent.safetensors"), "no such file"),
        (str(tmp_path), "is a folder"),
        (str(text), "not a readable safetensors file"),
        (plain, "no 'avar_steering' metadata; not a steering file"),
        (missing, "lacks the tensor(s) ['logit_scale']"),
    ]
    for path, expected in cases:
        with pytest.raises(SteeringError) as err:
            load_steering(path)
        assert expected in str(err.value) and "\n" not in str(err.value), path


def test_file_for_another_model_is_refused_naming_both(tiny, tmp_path):
    model, processor = tiny
    shape = model_steering_shape(model)
    other = {**shape, "num_heads": shape["num_heads"] * 2}
    path = _write(tmp_path, shape=other)
    bigger = _write(
        tmp_path, name="l.safetensors", shape={**shape, "num_layers": 5, "attention_layers": [0, 1, 2, 3, 4]}
    )
    family = _write(tmp_path, name="f.safetensors", shape={**shape, "model_type": "llava"})
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        for p, made_for in (
            (path, f"qwen2_5_vl with 3 layers × {other['num_heads']} heads"),
            (bigger, "qwen2_5_vl with 5 layers × 4 heads"),
            (family, "llava with 3 layers × 4 heads"),
        ):
            with pytest.raises(SteeringError) as err:
                handle.load_steering(p)
            msg = str(err.value)
            assert f"was made for {made_for}, but this model is qwen2_5_vl with 3 layers × 4 heads" in msg, msg
            assert "\n" not in msg
            with pytest.raises(SteeringError):
                patch_tables(model, load_steering(p))
        assert all(t is None for t in handle._state.bias)  # nothing was set by a refused file
    finally:
        handle.revert()


def test_save_refuses_tables_of_the_wrong_shape_or_value(tmp_path):
    shape = {"model_type": "qwen2_5_vl", "num_layers": 3, "num_heads": 4}
    path = str(tmp_path / "s.safetensors")
    with pytest.raises(SteeringError, match=r"bias must be \[3, 4, 4\]"):
        save_steering(path, torch.zeros(3, 2, G), torch.ones(3, 4, G), **shape)
    with pytest.raises(SteeringError, match=r"logit_scale\[1, 2, 3\] = inf"):
        scale = torch.ones(3, 4, G)
        scale[1, 2, 3] = float("inf")
        save_steering(path, torch.zeros(3, 4, G), scale, **shape)
    assert not os.path.exists(path) and not os.path.exists(path + ".partial")
