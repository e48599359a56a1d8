"""Training through the patch on the tiny Qwen2.5-VL: the AGTO objective L = L_LM + α·L_enhance_img +
β·L_suppress_sys, with masses from `collect_masses`, sends finite gradients through the fused attention into the
text decoder; they match the gradients of the published way of computing the masses (eager attention maps); and
a few optimizer steps move the user tokens' attention onto the image where L_LM alone does not.
"""

import pytest
import torch

from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl, synthetic_images
from avar_ops.core import testing
from avar_ops.data.samples import build_inputs
from avar_ops.hf import apply_to_qwen2_5_vl, collect_masses, revert, token_groups
from avar_ops.method import agto_losses, vas

# The paper's weights; at this learning rate the attention terms move the tiny model's image mass well past
# what L_LM alone does within a handful of AdamW steps.
ALPHA = BETA = 0.15
LR = 1e-3
STEPS = 6

SAMPLES = [
    ("What colour is the square?", "You are a careful visual reasoning assistant.", "The square is red."),
    ("How many circles are there in the picture?", "Answer briefly.", "There are two circles."),
]


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.train()  # attention dropout is 0 in Qwen2.5-VL, so train mode must run through the patch as well
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_to_qwen2_5_vl(model, tokenizer=processor)
    yield model, processor, initial
    revert(model)


@pytest.fixture(scope="module")
def batch(tiny):
    """Two image + system + question + answer samples of different lengths (so the batch is left-padded)."""
    _, processor, _ = tiny
    images = synthetic_images(len(SAMPLES), seed=3)
    samples = [
        {"id": f"s{i}", "images": [img], "question": q, "system": sys_prompt}
        for i, ((q, sys_prompt, _), img) in enumerate(zip(SAMPLES, images))
    ]
    inputs = build_inputs(processor, samples, responses=[a for _, _, a in SAMPLES])
    groups = token_groups(inputs["input_ids"], processor, inputs["attention_mask"])
    assert not inputs["attention_mask"].bool().all(), "the batch must contain padding"
    # SFT's L_LM: next-token loss on the answer tokens only.
    labels = inputs["input_ids"].masked_fill(~groups.response_mask, -100)  # [B, L]
    return inputs, groups, labels


def _objective(model, inputs, groups, labels, masses_from):
    """(L_LM, L_enhance_img, L_suppress_sys, per-layer masses) of one forward; masses_from(model, out) gives them."""
    out, masses = masses_from(model, inputs, labels)
    enhance, suppress = agto_losses(masses, groups.user_mask, groups.image_mask, groups.system_mask)
    return out.loss, enhance, suppress, masses


def _patched_masses(model, inputs, labels):
    with collect_masses(model) as rec:
        out = model(**inputs, labels=labels, use_cache=False)
    return out, rec.masses  # per layer [B, H, L, G]


def _text_attention(model):
    return [layer.self_attn for layer in model.model.language_model.layers]


def test_agto_gradients_reach_qkv_and_are_finite(tiny, batch):
    model, _, initial = tiny
    model.load_state_dict(initial)
    inputs, groups, labels = batch
    lm, enhance, suppress, _ = _objective(model, inputs, groups, labels, _patched_masses)
    attn = _text_attention(model)
    weights = [m.weight for a in attn for m in (a.q_proj, a.k_proj, a.v_proj)]
    attention_terms = torch.autograd.grad(
        ALPHA * enhance + BETA * suppress, weights, retain_graph=True, allow_unused=True
    )
    for layer in range(len(attn)):
        dq, dk, dv = attention_terms[3 * layer : 3 * layer + 3]
        # Only the masses carry these terms, so any gradient here went through the op's mass backward.
        assert dq is not None and dk is not None
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert dq.abs().max() > 0 and dk.abs().max() > 0
        if layer < len(attn) - 1:
            # v of a layer reaches the masses of the layers above it through the hidden states.
            assert dv is not None and torch.isfinite(dv).all() and dv.abs().max() > 0
        else:
            # The last layer's masses do not depend on its own values, and nothing sits above it.
            assert dv is None or not dv.any()
    trainable = [p for p in model.parameters() if p.requires_grad]
    full = torch.autograd.grad(lm + ALPHA * enhance + BETA * suppress, trainable, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in full)


def _eager_map_masses(eager, inputs, labels, key_group):
    """The published method's masses: eager attention maps summed over each group's key columns."""
    out = eager(**inputs, labels=labels, use_cache=False, output_attentions=True)
    kg = key_group.long()  # [B, L]
    onehot = torch.nn.functional.one_hot(kg.clamp(min=0), 4).to(torch.float32) * (kg >= 0)[..., None]  # [B, L, G]
    return out, [a @ onehot[:, None] for a in out.attentions]  # per layer [B, H, L, G]


def test_agto_gradient_matches_eager_maps(tiny, batch):
    model, _, initial = tiny
    model.load_state_dict(initial)
    eager, _ = build_tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    eager.load_state_dict(initial)
    eager.train()
    inputs, groups, labels = batch

    def grads(net, masses_from):
        attn = _text_attention(net)
        chosen = [attn[0].q_proj.weight, attn[-1].k_proj.weight]  # the deepest path and the direct one
        lm, enhance, suppress, _ = _objective(net, inputs, groups, labels, masses_from)
        attention_terms = torch.autograd.grad(ALPHA * enhance + BETA * suppress, chosen, retain_graph=True)
        objective = torch.autograd.grad(lm + ALPHA * enhance + BETA * suppress, chosen)
        return attention_terms + objective

    ours = grads(model, _patched_masses)
    ref = grads(eager, lambda net, x, y: _eager_map_masses(net, x, y, groups.key_group))
    for got, want in zip(ours, ref):
        assert want.abs().max() > 0
        assert testing.rel_err(got, want) <= testing.FP32_MODEL_GRAD_REL


def _user_attention(masses, groups):
    """(mean image mass of the user tokens, VAS) over layers, heads, user tokens and samples."""
    res = vas([m.detach() for m in masses], groups.user_mask)
    return float(res.image_mass.overall), float(res.vas.overall)


def _train(model, initial, batch, alpha, beta):
    """Image mass and VAS of the user tokens, and the losses, before each of STEPS AdamW steps and after the last."""
    model.load_state_dict(initial)
    inputs, groups, labels = batch
    decoder = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    opt = torch.optim.AdamW(decoder, lr=LR, weight_decay=0.0)
    history = []
    for step in range(STEPS + 1):
        lm, enhance, suppress, masses = _objective(model, inputs, groups, labels, _patched_masses)
        image_mass, score = _user_attention(masses, groups)
        history.append(
            {
                "image_mass": image_mass,
                "vas": score,
                "lm": lm.item(),
                "enhance": enhance.item(),
                "suppress": suppress.item(),
            }
        )
        if step == STEPS:
            break
        opt.zero_grad()
        (lm + alpha * enhance + beta * suppress).backward()
        opt.step()
    return history


CONVERGENCE_SEEDS = (0, 1, 2, 3, 4)


def agto_against_lm_only(seed):
    """(AGTO history, L_LM-only history) of STEPS AdamW steps from the tiny model of `seed` on the two samples
    with images drawn from `seed`."""
    model, processor = build_tiny_qwen2_5_vl(seed=seed)
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        images = synthetic_images(len(SAMPLES), seed=seed + 3)
        samples = [
            {"id": f"s{i}", "images": [img], "question": q, "system": sys_prompt}
            for i, ((q, sys_prompt, _), img) in enumerate(zip(SAMPLES, images))
        ]
        inputs = build_inputs(processor, samples, responses=[a for _, _, a in SAMPLES])
        groups = token_groups(inputs["input_ids"], processor, inputs["attention_mask"])
        labels = inputs["input_ids"].masked_fill(~groups.response_mask, -100)  # [B, L]
        batch = (inputs, groups, labels)
        lm_only = _train(model, initial, batch, 0.0, 0.0)
        agto = _train(model, initial, batch, ALPHA, BETA)
    finally:
        revert(model)
    return agto, lm_only


def convergence_numbers(agto, lm_only):
    """What the convergence test judges, for one seed."""
    return {
        "image_gain": agto[-1]["image_mass"] - agto[0]["image_mass"],
        "lm_only_image_gain": lm_only[-1]["image_mass"] - lm_only[0]["image_mass"],
        "vas_gain": agto[-1]["vas"] - agto[0]["vas"],
        "lm_only_vas_gain": lm_only[-1]["vas"] - lm_only[0]["vas"],
        "enhance_drop": agto[0]["enhance"] - agto[-1]["enhance"],
        "suppress_drop": agto[0]["suppress"] - agto[-1]["suppress"],
        "lm_drop": agto[0]["lm"] - agto[-1]["lm"],
        "first_step_image_gain": agto[1]["image_mass"] - agto[0]["image_mass"],
    }


def test_agto_steps_raise_image_attention():
    """Over CONVERGENCE_SEEDS (model and image seeds): in every seed the AGTO run ends with both attention terms
    lower and the user tokens' image mass and VAS higher than where it started and than the L_LM-only run ends
    (which starts from the same point); the median image-mass gain is more than twice L_LM alone's."""
    numbers = {}
    for seed in CONVERGENCE_SEEDS:
        agto, lm_only = agto_against_lm_only(seed)
        assert lm_only[0] == agto[0], seed  # same weights, same batch: the runs start from one point
        n = convergence_numbers(agto, lm_only)
        n["beats_lm_only_image"] = agto[-1]["image_mass"] > lm_only[-1]["image_mass"]
        n["beats_lm_only_vas"] = agto[-1]["vas"] > lm_only[-1]["vas"]
        numbers[seed] = n
    msg = f"per seed: {numbers}"
    for n in numbers.values():
        assert n["enhance_drop"] > 0 and n["suppress_drop"] > 0, msg
        assert n["image_gain"] > 0 and n["vas_gain"] > 0, msg
        assert n["beats_lm_only_image"] and n["beats_lm_only_vas"], msg
        assert n["lm_drop"] > 0, msg  # the language-model loss still trains alongside
    gains = sorted(n["image_gain"] for n in numbers.values())
    lm_gains = sorted(abs(n["lm_only_image_gain"]) for n in numbers.values())
    assert gains[len(gains) // 2] > 2 * lm_gains[len(lm_gains) // 2], msg
