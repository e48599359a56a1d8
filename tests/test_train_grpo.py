"""The GRPO loop on the tiny Qwen2.5-VL (CPU): r_visual from the fused forward equals the same quantity from
eager attention maps; steps run end to end and log every term; resume reproduces the next step's rollouts and
loss; with λ_v > 0 the advantages rank right rollouts by each kind of r_visual; held-out evaluation; data in
the OpenAI chat layout. The trainer's use of the reward (masks, gate, r_visual, prompt VAS, advantages, the sign
of the update) is checked against independently computed values in test_train_grpo_wiring.py."""

import json
import os

import pytest
import torch
from grpo_fixtures import hash_checker, initial_checker, write_colour_task

from avar_ops.analysis import build_tiny_qwen2_5_vl
from avar_ops.core import testing
from avar_ops.hf import get_handle, token_groups
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


def _eager_reference(per_layer_maps, key_group, response_mask, kind, cap, eps):
    """Every r_visual kind written out in float64 from eager attention maps, one rollout, token and layer at a
    time: m_g(l, t) = Σ_{j: group(j) = g} P_tj averaged over heads. Returns (r_visual [N], the per-token
    Eq. 5 terms [T] in batch-major order)."""
    rewards, token_ratios = [], []
    for n in range(response_mask.shape[0]):
        image_keys, system_keys = key_group[n] == 1, key_group[n] == 2
        terms, images, systems = [], [], []
        for t in torch.nonzero(response_mask[n]).flatten().tolist():
            ratios = []
            for maps in per_layer_maps:
                row = maps[n, :, t].double()  # [H, L]
                image = float(row[:, image_keys].sum(-1).mean())
                system = float(row[:, system_keys].sum(-1).mean())
                ratios.append(image / (system + eps))
                images.append(image)
                systems.append(system)
            token_ratios.append(sum(ratios) / len(ratios))
            capped = [min(r, cap) for r in ratios] if kind == "capped_ratio" else ratios
            terms.append(sum(capped) / len(capped))
        if kind in ("ratio", "capped_ratio"):
            rewards.append(sum(terms) / len(terms))
        elif kind == "ratio_of_sums":
            rewards.append(sum(images) / (sum(systems) + eps))
        else:
            rewards.append(sum(images) / len(images))
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(token_ratios, dtype=torch.float64)


@pytest.fixture(scope="module")
def eager_rollouts(data, tmp_path_factory):
    """Rollouts with left and right padding, their fused per-layer VisualStats and the eager attention maps of
    the same weights (the published way of getting the masses)."""
    trainer = _trainer(_cfg(data, tmp_path_factory.mktemp("eager"), max_completion_length=8))
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
    eager, _ = build_tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    eager.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    with torch.no_grad():
        out = eager(**ro.inputs, use_cache=False, output_attentions=True)
    key_group = torch.nn.functional.pad(ro.key_group.long(), (0, ro.completion_ids.shape[1]), value=0)  # [N, L]
    key_group = key_group.masked_fill(ro.inputs["attention_mask"] == 0, -1)
    return ro, per_layer, out.attentions, key_group


@pytest.mark.parametrize(
    "kind,cap", [("ratio", None), ("capped_ratio", 0.5), ("ratio_of_sums", None), ("image_mass", None)]
)
def test_r_visual_fused_equals_eager_maps(eager_rollouts, kind, cap):
    """Each recipe's r_visual from the fused forward (trainer path: VisualStats + visual_terms) equals the same
    quantity written out in float64 from eager attention maps; so do the logged per-token Eq. 5 terms."""
    ro, per_layer, maps, key_group = eager_rollouts
    fused = visual_terms(per_layer, ro.response_mask, ro.user_mask, eps=1e-6, kind=kind, cap=cap)
    want, want_tokens = _eager_reference(maps, key_group, ro.response_mask, kind, cap, 1e-6)
    assert fused.ratio.abs().min() > 0
    # Each value is built from fp32 model-level masses, each within FP32_MODEL_REL of the other path.
    assert testing.rel_err(fused.ratio, want) <= 2 * testing.FP32_MODEL_REL
    assert testing.rel_err(fused.token_ratios, want_tokens) <= 2 * testing.FP32_MODEL_REL
    if kind == "capped_ratio":
        plain = visual_terms(per_layer, ro.response_mask, eps=1e-6).ratio
        assert bool((fused.ratio < plain).any()), "the cap should bind on some terms of this batch"
    # The library's own function on the eager masses agrees too (it is what the trainer calls).
    onehot = torch.nn.functional.one_hot(key_group.clamp(min=0), 4).double() * (key_group >= 0)[..., None]
    masses = [a.double() @ onehot[:, None] for a in maps]  # per layer [N, H, L, 4]
    lib = visual_reward(masses, ro.response_mask, eps=1e-6, kind=kind, cap=cap)
    assert testing.rel_err(lib.double(), want) <= 1e-9


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
        "r_visual_token_p50",
        "r_visual_token_p90",
        "r_visual_token_max",
    }
    for rec in history:
        assert keys <= set(rec)
        assert all(isinstance(rec[k], (int, float)) and rec[k] == rec[k] for k in keys)
        assert rec["r_visual_raw"] > 0 and rec["r_visual"] <= rec["r_visual_raw"]
        assert 0 < rec["r_visual_token_p50"] <= rec["r_visual_token_p90"] <= rec["r_visual_token_max"]
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


@pytest.mark.parametrize(
    "kind,cap", [("ratio", None), ("capped_ratio", 0.5), ("ratio_of_sums", None), ("image_mass", None)]
)
def test_visual_reward_orders_the_advantages(data, tmp_path, kind, cap):
    """A deterministic construction in place of a run-to-run comparison (which, on the tiny model over 8 steps,
    goes either way with the seed): rollouts whose answers the checker marks right by a hash of the text, the
    format reward off. Within each group, among the rollouts with the same r_acc, the advantage orders them
    exactly as the chosen r_visual does (λ_v pays for the visual term), the wrong ones get no visual credit,
    and r_total is r_acc + λ_v·r_visual."""
    from avar_train.grpo.loss import group_advantages

    trainer = _trainer(
        _cfg(data, tmp_path, lambda_format=0.0, visual_reward=kind, visual_reward_cap=cap, max_completion_length=8)
    )
    ro = trainer.generate(trainer.records[:2])
    stats = VisualStats(ro.response_mask, ro.user_mask, eps=1e-6)
    with torch.no_grad():
        _, per_layer = trainer._forward_logps(trainer.model, ro, stats)
    br, terms = trainer._rewards(ro, per_layer)
    adv = group_advantages(br.total, 4, "group")
    right = br.correct
    assert bool(right.any()) and bool((~right).any()), "want right and wrong rollouts in the batch"
    assert torch.equal(br.visual, torch.where(right, terms.ratio, torch.zeros_like(terms.ratio)))
    assert torch.allclose(br.total, br.accuracy + 0.3 * br.visual, rtol=1e-12, atol=0)
    pairs = 0
    for g in range(adv.numel() // 4):
        idx = range(4 * g, 4 * g + 4)
        for i in idx:
            for j in idx:
                if right[i] and right[j] and terms.ratio[i] > terms.ratio[j]:
                    assert adv[i] > adv[j]
                    pairs += 1
                if not right[i] and not right[j]:
                    assert adv[i] == adv[j]  # no visual credit: equal, whatever their attention
    assert pairs > 0, "want two right rollouts with different r_visual in one group"


def test_bad_config_values():
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        load_grpo_config(None, dict(train_file="x", output_dir="y", per_device_train_batch_size=6, num_generations=4))
    with pytest.raises(ConfigError, match="unknown keys"):
        load_grpo_config(None, dict(train_file="x", output_dir="y", lamda_visual=0.3))
    base = dict(train_file="x", output_dir="y")
    with pytest.raises(ConfigError, match="visual_reward: must be one of ratio, capped_ratio"):
        load_grpo_config(None, dict(base, visual_reward="log_ratio"))
    with pytest.raises(ConfigError, match="visual_reward_cap: must be a number > 0 with visual_reward = capped"):
        load_grpo_config(None, dict(base, visual_reward="capped_ratio"))
    with pytest.raises(ConfigError, match="visual_reward_cap: must be null unless"):
        load_grpo_config(None, dict(base, visual_reward_cap=2.0))
    assert (
        load_grpo_config(None, dict(base, visual_reward="capped_ratio", visual_reward_cap=3)).visual_reward_cap == 3.0
    )
    with pytest.raises(ConfigError, match="data_format: must be one of avar, sharegpt, openai, auto"):
        load_grpo_config(None, dict(base, data_format="llava"))
    with pytest.raises(ConfigError, match="eval_steps: must be 0 without eval_file"):
        load_grpo_config(None, dict(base, eval_steps=2))
    with pytest.raises(ConfigError, match="loss_type"):
        load_grpo_config(None, dict(train_file="x", output_dir="y", loss_type="bnpo"))


def test_eval_file_logs_greedy_accuracy_and_vas_without_changing_training(data, tmp_path):
    """eval_file + eval_steps=1 over 2 steps: eval entries after step 1 and at the end; the training steps are
    the same as without evaluation (greedy decoding draws nothing from the RNG); eval_accuracy is the share of
    held-out records whose greedy completion, generated here record by record, the checker accepts."""
    from grpo_fixtures import write_colour_task

    held_out = write_colour_task(str(tmp_path / "held_out"), n=3, seed=5)

    def run(out, **kw):
        cfg = _cfg(data, out, max_steps=2, **kw)
        model, processor = build_tiny_qwen2_5_vl(seed=0)
        trainer = GRPOTrainer(cfg, model, processor, accuracy=accuracy_reward(initial_checker))
        return trainer, trainer.train()

    plain_trainer, plain = run(tmp_path / "plain")
    trainer, history = run(tmp_path / "eval", eval_file=held_out, eval_steps=1)
    assert history == [{**r, **{k: history[i][k] for k in r if k.startswith("time_")}} for i, r in enumerate(plain)]
    logged = [json.loads(line) for line in open(tmp_path / "eval" / "log.jsonl")]
    evals = [r for r in logged if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2] and evals == trainer.eval_history
    for r in evals:
        assert r["eval_samples"] == 3 and 0.0 <= r["eval_accuracy"] <= 1.0
        assert r["eval_prompt_vas"] > 0 and 0 < r["eval_response_image_mass"] < 1 and r["eval_r_visual_raw"] > 0

    policy = trainer.accelerator.unwrap_model(trainer.model)
    handle = get_handle(policy)
    correct = 0
    for record in trainer.eval_records:
        prompt = trainer.prompt_inputs([record])
        handle.set_key_groups(token_groups(prompt["input_ids"], trainer.processor, prompt["attention_mask"]).key_group)
        try:
            with torch.no_grad():
                ids = policy.generate(
                    **prompt,
                    do_sample=False,
                    max_new_tokens=6,
                    eos_token_id=trainer.eos_ids,
                    pad_token_id=trainer.pad_id,
                    suppress_tokens=trainer.vision_ids,
                )[0, prompt["input_ids"].shape[1] :]
        finally:
            handle.set_key_groups(None)
        cut = completion_mask(ids[None], trainer.eos_ids)[0]
        text = trainer.processor.tokenizer.decode(ids[cut], skip_special_tokens=True)
        correct += initial_checker([text], [record.answer])[0] == "correct"
    assert evals[-1]["eval_accuracy"] == pytest.approx(correct / 3)


def test_grpo_reads_openai_files(data, tmp_path):
    """The colour task written as OpenAI chat messages with image_url parts (file:// URLs, no ids) gives the
    same prompts and the same first step as avar's layout."""
    folder = os.path.dirname(data)
    path = os.path.join(folder, "openai.jsonl")
    with open(path, "w") as f:
        for line in open(data):
            r = json.loads(line)
            turns = [{"role": "system", "content": r["system"]}] if "system" in r else []
            url = "file://" + os.path.join(folder, r["image"])
            parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": r["question"]}]
            turns.append({"role": "user", "content": parts})
            f.write(json.dumps({"messages": turns, "answer": r["answer"]}) + "\n")
    plain = _trainer(_cfg(data, tmp_path / "avar", max_steps=1))
    a = plain.train()[0]
    chat = _trainer(_cfg(path, tmp_path / "openai", max_steps=1, data_format="auto"))  # seeds the RNG again
    assert [r.messages for r in chat.records] == [r.messages for r in plain.records]
    assert [r.id for r in chat.records][:2] == ["openai.jsonl:1", "openai.jsonl:2"]
    b = chat.train()[0]
    assert (a["loss"], a["reward"], a["r_visual_raw"]) == (b["loss"], b["reward"], b["r_visual_raw"])


def test_visual_layers_follow_the_one_index_rule(data, tmp_path):
    """visual_layers takes -n <= i < n like every other layer selection (avar_ops.core.select_indices)."""
    cfg = _cfg(data, tmp_path, visual_layers=[-1, 0])
    trainer = _trainer(cfg)
    n = trainer.model.config.text_config.num_hidden_layers
    assert trainer.visual_layers == sorted({0, n - 1})
    with pytest.raises(ValueError, match=rf"visual_layers: index {-n - 1} is out of range for {n}"):
        _trainer(_cfg(data, tmp_path, visual_layers=[-n - 1]))
