"""The SFT trainer's AGTO terms, checked against values computed without it.

`AGTOTrainer.compute_loss` on one collated batch of the tiny Qwen2.5-VL: the logged L_enhance_img and
L_suppress_sys and the returned loss are compared with the terms the test computes from eager attention maps of
the same weights, over image, system and user masks rebuilt from the token ids and the chat template
(`template_masks`). The batch has a different number of image and system keys, so that a trainer that swaps the
two key masks gives other values (the test checks the swapped values are far apart); L_suppress_sys is the log
of a mean attention below 1, so it is negative, and the returned loss must carry it with the plus sign.
"""

import pytest
import torch
from sft_fixtures import write_sft_records
from template_masks import agto_from_maps, template_masks

from avar_ops.analysis import build_tiny_qwen2_5_vl
from avar_ops.core import testing
from avar_ops.data.records import load_records
from avar_ops.hf import apply_to_qwen2_5_vl
from avar_train.data.collator import QwenVLCollator
from avar_train.sft.config import SFTConfig
from avar_train.sft.trainer import LOG_KEYS, AGTOSettings, AGTOTrainer, training_arguments

EPS = 1e-6
TOL = 2 * testing.FP32_MODEL_REL
SEEDS = (0, 1, 2)


def _setup(tmp_path, seed, alpha, beta):
    # A system prompt longer than any image's token count (at most 16 at these pixel limits).
    system = "You are a careful visual reasoning assistant; look at the image and answer briefly."
    train_file = write_sft_records(str(tmp_path / "data"), n=2, seed=seed, system=system)
    model, processor = build_tiny_qwen2_5_vl(seed=seed)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_to_qwen2_5_vl(model, tokenizer=processor)
    model.train()
    cfg = SFTConfig(
        model_name_or_path="tiny", train_file=train_file, output_dir=str(tmp_path / "out"), max_steps=1
    ).validate()
    collator = QwenVLCollator(processor, max_length=256, min_pixels=56 * 56, max_pixels=112 * 112, mode="sft")
    batch = collator(load_records(train_file, use="sft").records)
    trainer = AGTOTrainer(
        model=model,
        args=training_arguments(cfg),
        agto=AGTOSettings(alpha=alpha, beta=beta, eps=EPS),
        data_collator=collator,
    )
    return trainer, model, processor, weights, batch


def _eager_terms(weights, seed, processor, batch):
    """(L_LM, L_enhance_img, L_suppress_sys, the same two with the image and system key masks swapped) from
    eager maps over rebuilt masks."""
    eager, _ = build_tiny_qwen2_5_vl(seed=seed, attn_implementation="eager")
    eager.load_state_dict(weights)
    eager.train()
    inputs = QwenVLCollator.model_inputs(batch)
    with torch.no_grad():
        out = eager(**inputs, use_cache=False, output_attentions=True)
    masks = template_masks(batch["input_ids"], batch["attention_mask"], processor)
    n_img, n_sys = masks["image"].sum(-1), masks["system"].sum(-1)
    assert (n_img != n_sys).all() and (n_img > 0).all() and (n_sys > 0).all(), (n_img, n_sys)
    enhance, suppress = agto_from_maps(out.attentions, masks["image"], masks["system"], masks["user"], EPS)
    # A trainer with the key masks swapped divides each group's mass by the other group's key count.
    m_img = [a.double() @ masks["image"].double()[:, None, :, None] for a in out.attentions]
    m_sys = [a.double() @ masks["system"].double()[:, None, :, None] for a in out.attentions]
    q = masks["user"].double()
    nq = q.sum(-1)

    def term(masses, n_keys):
        per_lh = [torch.log((x[..., 0] * q[:, None]).sum(-1) / (nq * n_keys)[:, None] + EPS) for x in masses]
        return torch.stack(per_lh).mean(dim=(0, 2)).mean()

    swapped = (-term(m_img, n_sys.double()), term(m_sys, n_img.double()))
    return float(out.loss), float(enhance), float(suppress), tuple(float(x) for x in swapped)


@pytest.mark.parametrize("seed", SEEDS)
def test_agto_terms_and_loss_equal_eager_maps(tmp_path, seed):
    alpha, beta = 0.15, 0.25  # unequal, so that a trainer that swaps the two weights is caught as well
    trainer, model, processor, weights, batch = _setup(tmp_path, seed, alpha, beta)
    loss = trainer.compute_loss(model, dict(batch))
    logged = dict(zip(LOG_KEYS, (trainer._sums / trainer._count).tolist()))
    lm, enhance, suppress, (enhance_swapped, suppress_swapped) = _eager_terms(weights, seed, processor, batch)

    def close(got, want):
        return abs(got - want) <= TOL * abs(want)

    assert suppress < 0 and enhance > 0  # log of a mean attention per pair, which is below 1
    assert logged["loss_suppress_sys"] < 0, logged
    assert close(logged["loss_lm"], lm), (logged["loss_lm"], lm)
    assert close(logged["loss_enhance_img"], enhance), (logged["loss_enhance_img"], enhance)
    assert close(logged["loss_suppress_sys"], suppress), (logged["loss_suppress_sys"], suppress)
    # Swapped key masks give values this far apart, so the two checks above tell the masks apart.
    assert abs(enhance_swapped - enhance) > 20 * TOL * abs(enhance)
    assert abs(suppress_swapped - suppress) > 20 * TOL * abs(suppress)
    want = lm + alpha * enhance + beta * suppress
    assert close(float(loss.detach()), want), (float(loss.detach()), want, lm, enhance, suppress)
    assert abs(2 * beta * suppress) > 20 * TOL * abs(want)  # a flipped suppress sign moves the loss this much


@pytest.mark.parametrize("seed", SEEDS)
def test_agto_gradient_equals_eager_maps(tmp_path, seed):
    """The gradient the trainer's loss sends into the first layer's queries is the eager objective's."""
    alpha, beta = 0.15, 0.25
    trainer, model, processor, weights, batch = _setup(tmp_path, seed, alpha, beta)
    q0 = model.model.language_model.layers[0].self_attn.q_proj.weight
    (got,) = torch.autograd.grad(trainer.compute_loss(model, dict(batch)), [q0])

    eager, _ = build_tiny_qwen2_5_vl(seed=seed, attn_implementation="eager")
    eager.load_state_dict(weights)
    eager.train()
    out = eager(**QwenVLCollator.model_inputs(batch), use_cache=False, output_attentions=True)
    masks = template_masks(batch["input_ids"], batch["attention_mask"], processor)
    enhance, suppress = agto_from_maps(out.attentions, masks["image"], masks["system"], masks["user"], EPS)
    e_q0 = eager.model.language_model.layers[0].self_attn.q_proj.weight
    (suppress_only,) = torch.autograd.grad(beta * suppress.float(), [e_q0], retain_graph=True)
    (want,) = torch.autograd.grad(out.loss + alpha * enhance.float() + beta * suppress.float(), [e_q0])
    assert suppress_only.abs().max() > 0
    # The suppress term's share of the gradient is well above the tolerance: its sign is checked too.
    assert testing.rel_err(got, want - 2 * suppress_only) > 10 * testing.FP32_MODEL_GRAD_REL
    assert testing.rel_err(got, want) <= testing.FP32_MODEL_GRAD_REL
