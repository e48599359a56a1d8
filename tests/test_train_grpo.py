"""The GRPO loop on the tiny Qwen2.5-VL (CPU): r_visual from the fused forward equals the same quantity from
eager attention maps; steps run end to end and log every term; resume reproduces the next step's rollouts and
loss. The trainer's use of the reward (masks, gate, r_visual, prompt VAS, advantages, the sign of the update) is
checked against independently computed values in test_train_grpo_wiring.py."""

import json
import os

import pytest
import torch
from grpo_fixtures import hash_checker, write_colour_task

from avar_ops.analysis import build_tiny_qwen2_5_vl
from avar_ops.core import testing
from avar_ops.method import visual_reward
from avar_train.grpo.config import ConfigError, load_grpo_config
from avar_train.grpo.rewards import VisualStats, accuracy_reward, visual_terms
from avar_train.grpo.trainer import GRPOTrainer, completion_logps, completion_mask


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_task(str(tmp_path_factory.mktemp("colour")), n=6)


def _cfg(data, out, **kw):
    base = dict(
        model_name_or_path="tiny",
        train_file=data,
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-3,
        seed=0,
    )
    base.update(kw)
    return load_grpo_config(None, base)


def _trainer(cfg, **kw):
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    return GRPOTrainer(cfg, model, processor, accuracy=accuracy_reward(hash_checker), **kw)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5], [9, 1, 1, 1, 1]])
    assert completion_mask(ids, [9]).tolist() == [
        [True, True, True, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]


def test_completion_logps_are_normalised_tempered_log_probs():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 5, 17, generator=gen) * 4  # [B, C, V]
    ids = torch.randint(0, 17, (3, 5), generator=gen)  # [B, C]
    want = torch.log_softmax(logits.double() / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)  # [B, C]
    got = completion_logps(logits, ids, 0.7)
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-5)


def test_r_visual_fused_equals_eager_maps(data, tmp_path):
    trainer = _trainer(_cfg(data, tmp_path, max_completion_length=8))
    records = trainer.records[:2]  # with and without their own system prompt: two lengths, left padding
    sampled = trainer.generate(records)
    # End two completions early, so that the batch has right padding after an end-of-sequence token as well as
    # the prompts' left padding.
    ids = sampled.completion_ids.clone()  # [N, C]
    ids[0, 2] = ids[1, 5] = trainer.eos_ids[0]
    expanded = [r for r in records for _ in range(4)]
    ro = trainer.assemble(expanded, trainer.prompt_inputs(expanded), ids)
    assert ro.completion_mask.sum(-1).tolist()[:2] == [3, 6]
    assert not ro.inputs["attention_mask"][:, 0].all(), "want left padding in the prompts"
    stats = VisualStats(ro.response_mask, ro.user_mask, eps=1e-6)
    with torch.no_grad():
        _, per_layer = trainer._forward_logps(trainer.model, ro, stats)
    fused = visual_terms(per_layer, ro.response_mask, ro.user_mask).ratio  # [N]

    # The published way: eager attention maps of the same weights, summed over each group's key columns.
    eager, _ = build_tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    eager.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    with torch.no_grad():
        out = eager(**ro.inputs, use_cache=False, output_attentions=True)
    P = ro.prompt_len
    key_group = torch.nn.functional.pad(ro.key_group.long(), (0, ro.completion_ids.shape[1]), value=0)  # [N, L]
    key_group = key_group.masked_fill(ro.inputs["attention_mask"] == 0, -1)
    onehot = torch.nn.functional.one_hot(key_group.clamp(min=0), 4).double() * (key_group >= 0)[..., None]
    masses = [a.double() @ onehot[:, None] for a in out.attentions]  # per layer [N, H, L, 4]
    eager_ratio = visual_reward(masses, ro.response_mask, eps=1e-6)
    assert P > 0 and fused.abs().min() > 0
    # Each ratio is a quotient of two fp32 model-level masses, each within FP32_MODEL_REL of the other path.
    assert testing.rel_err(fused, eager_ratio) <= 2 * testing.FP32_MODEL_REL


def test_steps_end_to_end(data, tmp_path):
    cfg = _cfg(data, tmp_path, max_steps=2, save_steps=1, beta=0.04)  # with the KL to a frozen reference

    def short(prompts, completions, completion_ids, **columns):  # a user reward with TRL's signature
        assert columns["answer"] and len(columns["answer"]) == len(completions)
        return [-len(ids) / 10 for ids in completion_ids]

    trainer = _trainer(cfg, reward_funcs={"short": short}, reward_weights={"short": 0.5})
    before = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2]
    keys = {
        "loss",
        "reward",
        "r_acc",
        "r_format",
        "r_visual_raw",
        "r_visual",
        "accuracy",
        "response_image_mass",
        "prompt_vas",
        "completion_length",
        "clip_low",
        "clip_high",
        "time_generation",
        "time_scoring",
        "time_update",
        "checker_timeouts",
        "checker_errors",
        "grad_norm",
    }
    for rec in history:
        assert keys <= set(rec)
        assert all(isinstance(rec[k], (int, float)) and rec[k] == rec[k] for k in keys)
        assert rec["r_visual_raw"] > 0 and rec["r_visual"] <= rec["r_visual_raw"]
        assert rec["reward/short"] == pytest.approx(-rec["completion_length"] / 10)
        assert rec["reward"] == pytest.approx(
            rec["r_acc"] + 0.3 * rec["r_visual"] + 0.1 * rec["r_format"] + 0.5 * rec["reward/short"]
        )
    # The reference is the initial policy: no KL before the first update, some after it.
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-9) and history[1]["kl"] > 0
    logged = [json.loads(line) for line in open(os.path.join(tmp_path, "log.jsonl"))]
    assert logged == history
    assert os.path.isdir(os.path.join(tmp_path, "checkpoint-1")) and os.path.isdir(
        os.path.join(tmp_path, "checkpoint-2")
    )
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_resume_reproduces_next_step(data, tmp_path, num_iterations):
    def run(out, steps, resume=None):
        cfg = _cfg(
            data,
            out,
            max_steps=steps,
            num_iterations=num_iterations,
            resume_from_checkpoint=resume,
            max_completion_length=4,
        )
        trainer = _trainer(cfg)
        seen = []
        generate = trainer.generate

        def recording(records):
            ro = generate(records)
            seen.append(ro.completion_ids.clone())
            return ro

        trainer.generate = recording
        return trainer.train(), seen

    straight, straight_ids = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, resumed_ids = run(tmp_path / "b", 2, resume=str(tmp_path / "b" / "checkpoint-1"))
    assert len(resumed) == 1 and resumed[0]["step"] == 2
    # The second step's rollouts depend on the first update (and on the RNG and data position): equal ids and
    # losses mean all three were restored.
    assert torch.equal(resumed_ids[0], straight_ids[1])
    for key in ("loss", "reward", "r_visual_raw", "clip_high"):
        assert resumed[0][key] == pytest.approx(straight[1][key], rel=1e-6, abs=1e-9)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        load_grpo_config(None, dict(train_file="x", output_dir="y", per_device_train_batch_size=6, num_generations=4))
    with pytest.raises(ConfigError, match="unknown keys"):
        load_grpo_config(None, dict(train_file="x", output_dir="y", lamda_visual=0.3))
    with pytest.raises(ConfigError, match="loss_type"):
        load_grpo_config(None, dict(train_file="x", output_dir="y", loss_type="bnpo"))
