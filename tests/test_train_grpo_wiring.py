"""The GRPO trainer's use of the reward, checked against values computed without it.

One `train_step` runs on the tiny Qwen2.5-VL with rollouts cut short by an end-of-sequence token (so that the
batch carries right padding after EOS as well as the prompts' left padding). Its logged terms and its
advantages are compared with what the test computes on its own: masks rebuilt from the token ids and the chat
template (`template_masks`), r_visual, the response image mass and the prompts' VAS from eager attention maps
of the same weights over those masks, the gate from the checker's verdicts, the format reward from the regex
and the group-normalised advantages from their definition. An always-right and an always-wrong checker pin
the gate from both sides.

The visual reward's effect on the policy is stated as the sign of the update: with every answer right and no
other reward, the advantages are an increasing function of r_visual inside each group, and one small update
raises the log-probability of a group's higher-r_visual rollouts against its lower ones
(Σ_i A_i·Δ mean_t log p_i > 0, the first-order decrease of the policy loss). That holds for every model and
data seed at a small enough step; the seeds are listed and each seed's number is in the assertion message.
"""

import re

import pytest
import torch
from grpo_fixtures import write_colour_task
from template_masks import (
    first_eos_mask,
    r_visual_from_maps,
    response_image_mass_from_maps,
    template_masks,
    vas_from_maps,
)

from avar_ops.analysis import build_tiny_qwen2_5_vl
from avar_ops.core import testing
from avar_train.grpo.config import load_grpo_config
from avar_train.grpo.rewards import DEFAULT_FORMAT_PATTERN, accuracy_reward
from avar_train.grpo.trainer import GRPOTrainer

EPS = 1e-6
LAMBDA_V, LAMBDA_F = 0.3, 0.1
GENERATIONS = 4
# Each quantity is a quotient of fp32 model-level masses (fused vs eager), each within FP32_MODEL_REL.
TOL = 2 * testing.FP32_MODEL_REL


def always_right(completions, references):
    return ["correct"] * len(completions)


def always_wrong(completions, references):
    return ["incorrect"] * len(completions)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_task(str(tmp_path_factory.mktemp("colour")), n=4, seed=0)


def _trainer(data, out, checker, seed=0, **kw):
    values = dict(
        model_name_or_path="tiny",
        train_file=data,
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=2 * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=8,
        learning_rate=1e-3,
        lambda_visual=LAMBDA_V,
        lambda_format=LAMBDA_F,
        visual_eps=EPS,
        seed=seed,
    )
    values.update(kw)
    cfg = load_grpo_config(None, values)
    model, processor = build_tiny_qwen2_5_vl(seed=seed)
    return GRPOTrainer(cfg, model, processor, accuracy=accuracy_reward(checker))


def _record_step(trainer):
    """Run one train_step with completions ended early by EOS; returns (log, rollouts, weights before the
    update, (logps, old logps, advantages) of the update)."""
    seen = {}
    generate, update = trainer.generate, trainer._update

    def early_eos(records):
        ro = generate(records)
        ids = ro.completion_ids.clone()  # [N, C]
        C = ids.shape[1]
        filler = int(trainer.processor.tokenizer.convert_tokens_to_ids("a"))
        eos = trainer.eos_ids[0]
        # Rollout n ends at token n % C (the last rows keep their sampled length); what follows EOS is a
        # real token the trainer must turn into padding.
        for n in range(min(ids.shape[0], C - 1)):
            ids[n, n] = eos
            ids[n, n + 1 :] = filler
        expanded = [r for r in records for _ in range(trainer.cfg.num_generations)]
        ro = trainer.assemble(expanded, trainer.prompt_inputs(expanded), ids)
        seen["raw_ids"] = ids
        seen["rollouts"] = ro
        seen["weights"] = {
            k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
        }
        return ro

    def recording_update(logps, old, adv, ro, loss_kwargs):
        seen["update"] = (logps.detach().clone(), old.detach().clone(), adv.detach().clone())
        return update(logps, old, adv, ro, loss_kwargs)

    trainer.generate, trainer._update = early_eos, recording_update
    log = trainer.train_step()
    return log, seen


def _independent(trainer, seen):
    """Everything the step's log should say, from eager maps of the pre-update weights and rebuilt masks."""
    ro = seen["rollouts"]
    P, C = ro.prompt_len, ro.completion_ids.shape[1]
    prompt = {"input_ids": ro.inputs["input_ids"][:, :P], "attention_mask": ro.inputs["attention_mask"][:, :P]}
    masks = template_masks(prompt["input_ids"], prompt["attention_mask"], trainer.processor)
    pad_c = torch.zeros(ro.completion_ids.shape[0], C, dtype=torch.bool)
    image_keys = torch.cat([masks["image"], pad_c], 1)  # [N, P + C]: completion tokens are never image keys
    system_keys = torch.cat([masks["system"], pad_c], 1)
    user = torch.cat([masks["user"], pad_c], 1)
    eos_ids = {int(i) for i in trainer.eos_ids}
    response = torch.cat([torch.zeros_like(masks["user"]), first_eos_mask(seen["raw_ids"], eos_ids)], 1)
    eager, _ = build_tiny_qwen2_5_vl(seed=trainer.cfg.seed, attn_implementation="eager")
    eager.load_state_dict(seen["weights"])
    with torch.no_grad():
        maps = eager(**ro.inputs, use_cache=False, output_attentions=True).attentions  # per layer [N, H, L, L]
    fmt = torch.tensor(
        [1.0 if re.fullmatch(DEFAULT_FORMAT_PATTERN, c, re.DOTALL) else 0.0 for c in ro.completions],
        dtype=torch.float64,
    )
    return {
        "maps": maps,
        "image_keys": image_keys,
        "system_keys": system_keys,
        "response": response,
        "user": user,
        "r_visual": r_visual_from_maps(maps, image_keys, system_keys, response, EPS),
        "image_mass": response_image_mass_from_maps(maps, image_keys, response),
        "vas": vas_from_maps(maps, image_keys, system_keys, user, EPS),
        "format": fmt,
    }


def _advantages(total):
    groups = total.view(-1, GENERATIONS)  # [P, G]
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)  # [N]


@pytest.fixture(scope="module")
def right_step(data, tmp_path_factory):
    trainer = _trainer(data, tmp_path_factory.mktemp("right"), always_right)
    log, seen = _record_step(trainer)
    return trainer, log, seen, _independent(trainer, seen)


def test_masks_equal_the_rebuilt_ones(right_step):
    """The response mask holds each completion up to its first EOS (padding after it excluded); the user mask
    the user-turn content (not the system turn)."""
    trainer, _, seen, want = right_step
    ro = seen["rollouts"]
    lengths = want["response"].sum(-1)
    assert lengths.min() < lengths.max(), "want completions of several lengths"
    assert not ro.inputs["attention_mask"][:, 0].all(), "want left padding in the prompts"
    assert want["user"].any(-1).all()
    assert torch.equal(ro.response_mask.cpu(), want["response"])
    assert torch.equal(ro.user_mask.cpu(), want["user"])
    assert torch.equal(ro.completion_mask.cpu(), want["response"][:, ro.prompt_len :])
    # The text the rewards read ends at the first EOS too (the test put real tokens after it).
    tok = trainer.processor.tokenizer
    kept = want["response"][:, ro.prompt_len :]
    texts = [tok.decode(ids[m].tolist(), skip_special_tokens=True) for ids, m in zip(seen["raw_ids"], kept)]
    assert ro.completions == texts


def test_logged_terms_equal_eager_maps_with_always_right_checker(right_step):
    _, log, _, want = right_step
    r = want["r_visual"]
    assert r.min() > 0
    assert log["accuracy"] == 1.0 and log["r_acc"] == 1.0
    assert log["r_format"] == pytest.approx(float(want["format"].mean()), abs=1e-12)
    for key, value in (
        ("r_visual_raw", r),
        ("r_visual", r),  # every answer right: the gate passes all
        ("response_image_mass", want["image_mass"]),
        ("prompt_vas", want["vas"]),
    ):
        assert abs(log[key] - float(value.mean())) <= TOL * float(value.abs().mean()), (key, log[key], value)
    total = 1.0 + LAMBDA_V * r + LAMBDA_F * want["format"]
    assert log["reward"] == pytest.approx(float(total.mean()), rel=TOL)


def test_prompt_vas_is_over_user_not_system_tokens(right_step):
    """Told apart by value: the VAS over the system turn's queries is far from the one over the user's."""
    _, log, seen, want = right_step
    P = seen["rollouts"].prompt_len
    system_queries = want["system_keys"].clone()
    system_queries[:, P:] = False
    assert not (system_queries & want["user"]).any()
    system_vas = float(vas_from_maps(want["maps"], want["image_keys"], want["system_keys"], system_queries, EPS).mean())
    user_vas = float(want["vas"].mean())
    assert abs(system_vas - user_vas) > 20 * TOL * user_vas, (system_vas, user_vas)
    assert abs(log["prompt_vas"] - user_vas) <= TOL * user_vas, (log["prompt_vas"], user_vas, system_vas)


def test_advantages_follow_the_independent_rewards(right_step):
    _, _, seen, want = right_step
    _, _, adv = seen["update"]
    total = 1.0 + LAMBDA_V * want["r_visual"] + LAMBDA_F * want["format"]  # [N]
    expected = _advantages(total)
    # Advantages divide by a group's spread, which here is λ_v times the spread of r_visual alone.
    spread = (LAMBDA_V * want["r_visual"]).view(-1, GENERATIONS).std(1).min()
    assert spread > 1e-3
    assert torch.allclose(adv.double().cpu(), expected, rtol=0, atol=20 * TOL * float(expected.abs().max()))


def test_always_wrong_checker_gates_r_visual_to_zero(data, tmp_path):
    trainer = _trainer(data, tmp_path, always_wrong)
    log, seen = _record_step(trainer)
    want = _independent(trainer, seen)
    r = want["r_visual"]
    assert log["accuracy"] == 0.0 and log["r_acc"] == 0.0
    assert abs(log["r_visual_raw"] - float(r.mean())) <= TOL * float(r.mean())  # measured, then gated
    assert log["r_visual"] == 0.0
    assert log["reward"] == pytest.approx(float(LAMBDA_F * want["format"].mean()), abs=1e-12)
    _, _, adv = seen["update"]
    expected = _advantages(LAMBDA_F * want["format"])
    assert torch.allclose(adv.double().cpu(), expected, atol=1e-9)


def test_partial_accuracy_is_not_a_correct_answer(data, tmp_path):
    """A user accuracy function scoring 0.5 adds 0.5 to r_acc but no rollout counts as correct: the logged
    accuracy is 0 and r_visual is gated to 0."""
    trainer = _trainer(data, tmp_path, always_right)
    trainer.accuracy = lambda prompts, completions, completion_ids, **columns: [0.5] * len(completions)
    log, seen = _record_step(trainer)
    want = _independent(trainer, seen)
    assert log["r_acc"] == 0.5 and log["accuracy"] == 0.0 and log["r_visual"] == 0.0
    assert log["r_visual_raw"] > 0
    assert log["reward"] == pytest.approx(0.5 + float(LAMBDA_F * want["format"].mean()), abs=1e-12)


# -------------------------------------------------------------------------------- the sign of the update

UPDATE_SEEDS = (0, 1, 2, 3, 4)


def visual_update_gain(data, out, seed, lambda_visual=LAMBDA_V):
    """(Σ_i A_i·Δ mean_t log p_i, advantages) of one update with every answer right and only the visual
    reward: A from r_visual recomputed on eager maps, Δ the change of each rollout's mean completion log-prob
    from the update."""
    trainer = _trainer(
        data, out, always_right, seed=seed, lambda_format=0.0, lambda_visual=lambda_visual, learning_rate=1e-4
    )
    _, seen = _record_step(trainer)
    ro = seen["rollouts"]
    with torch.no_grad():
        after, _ = trainer._forward_logps(trainer.model, ro, None)  # [N, C]
    _, before, adv = seen["update"]
    m = ro.completion_mask.double()
    delta = ((after - before).double() * m).sum(-1) / m.sum(-1)  # [N]
    want = _independent(trainer, seen)
    expected = _advantages(1.0 + lambda_visual * want["r_visual"])
    return float((expected * delta).sum()), expected, adv.double().cpu()


def test_visual_reward_update_favours_high_r_visual_rollouts(data, tmp_path):
    gains = {}
    for seed in UPDATE_SEEDS:
        gain, expected, adv = visual_update_gain(data, tmp_path / f"s{seed}", seed)
        assert torch.allclose(adv, expected, atol=20 * TOL * float(expected.abs().max())), seed
        gains[seed] = gain
    assert all(g > 0 for g in gains.values()), f"Σ A·Δlogp per seed: {gains}"


def test_no_visual_reward_no_update_signal(data, tmp_path):
    """λ_v = 0 and every answer right: all rewards are equal and every advantage is 0."""
    _, expected, adv = visual_update_gain(data, tmp_path, seed=0, lambda_visual=0.0)
    assert adv.abs().max() == 0 and expected.abs().max() == 0
