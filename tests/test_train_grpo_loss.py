"""GRPO advantages and policy loss against values worked out by hand (plain Python floats, written out)."""

import math

import pytest
import torch

from avar_train.grpo.loss import group_advantages, policy_loss


def test_group_advantages_group_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4, "group")
    # Group 1: mean 0.5, unbiased std sqrt(4·0.25 / 3); group 2: all equal, so 0 whatever the guard.
    std = math.sqrt(1.0 / 3.0)
    a = 0.5 / (std + 1e-4)
    expected = [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)


def test_group_advantages_batch_and_none():
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    none = group_advantages(rewards, 2, "none")
    assert none.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-12)
    # Batch std of [3, 1, 0, 0]: mean 1, squared deviations 4 + 0 + 1 + 1 = 6, unbiased 6/3 = 2.
    batch = group_advantages(rewards, 2, "batch")
    s = math.sqrt(2.0) + 1e-4
    assert batch.tolist() == pytest.approx([1.0 / s, -1.0 / s, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_generations=3), "groups"),
        (dict(num_generations=0), "num_generations"),
        (dict(num_generations=2, scale_rewards="std"), "scale_rewards"),
    ],
)
def test_group_advantages_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(4), **kwargs)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)


# Two rollouts, three completion slots; rollout 1 has two tokens (its third slot is padding).
LOGP = [[math.log(1.5), math.log(0.5), 0.0], [math.log(0.9), math.log(1.1), math.log(3.0)]]
OLD = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
MASK = [[True, True, False], [True, True, True]]
ADV = [1.0, -2.0]


def _hand_per_token(eps_low, eps_high):
    """ℓ = −min(ρA, clip(ρ)A) per token, written out: ratios are exp(logp) since old_logp = 0."""
    out = []
    for row, a in zip(LOGP, ADV):
        vals = []
        for lp in row:
            r = math.exp(lp)
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            vals.append(-min(r * a, c * a))
        out.append(vals)
    return out


def _tensors():
    logps = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    return logps, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK)


def test_per_token_values_written_out():
    # Rollout 0 (A = 1): ρ = 1.5 → clipped to 1.2: −min(1.5, 1.2) = −1.2; ρ = 0.5: −min(0.5, 0.8) = −0.5.
    # Rollout 1 (A = −2): ρ = 0.9: −min(−1.8, −1.8) = 1.8; ρ = 1.1: 2.2; ρ = 3 → 1.2: −min(−6, −2.4) = 6.
    assert _hand_per_token(0.2, 0.2)[0][:2] == pytest.approx([-1.2, -0.5])
    assert _hand_per_token(0.2, 0.2)[1] == pytest.approx([1.8, 2.2, 6.0])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_policy_loss_aggregations(loss_type, eps_high):
    logps, old, adv, mask = _tensors()
    res = policy_loss(
        logps, old, adv, mask, epsilon=0.2, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=4
    )
    pt = _hand_per_token(0.2, 0.2 if eps_high is None else eps_high)
    rows = [sum(v for v, m in zip(r, mr) if m) for r, mr in zip(pt, MASK)]
    counts = [sum(mr) for mr in MASK]
    if loss_type == "grpo":
        want = (rows[0] / counts[0] + rows[1] / counts[1]) / 2
    elif loss_type == "dr_grpo":
        want = (rows[0] + rows[1]) / (2 * 4)
    else:
        want = (rows[0] + rows[1]) / (counts[0] + counts[1])
    assert res.loss.item() == pytest.approx(want, abs=1e-12)
    # Clipped tokens: ρ = 1.5 with A > 0 clips high at 1.2 (not at 1.28... yes: 1.5 > 1.28 too);
    # ρ = 3 with A < 0 is not clipped by the min (the unclipped term is the smaller one): no low clip.
    assert res.clip_high.item() == pytest.approx(1 / 5)
    assert res.clip_low.item() == 0.0
    assert res.kl is None
    res.loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[0, 2] == 0  # padding gets no gradient


def test_low_clip_counted():
    logps = torch.log(torch.tensor([[0.5, 1.0]], dtype=torch.float64))
    res = policy_loss(
        logps,
        torch.zeros(1, 2, dtype=torch.float64),
        torch.tensor([-1.0], dtype=torch.float64),
        torch.ones(1, 2, dtype=torch.bool),
    )
    # ρ = 0.5 < 0.8 with A < 0: −min(−0.5, −0.8) = 0.8 (the clipped term); ρ = 1: 1. grpo mean: 0.9.
    assert res.loss.item() == pytest.approx(0.9)
    assert res.clip_low.item() == pytest.approx(0.5)


def test_kl_term():
    logps, old, adv, mask = _tensors()
    ref = torch.tensor([[0.1, -0.2, 0.0], [0.0, 0.3, 0.0]], dtype=torch.float64)
    res = policy_loss(logps, old, adv, mask, beta=0.04, ref_logps=ref, loss_type="dapo")
    pt = _hand_per_token(0.2, 0.2)
    total, kl_total = 0.0, 0.0
    for i in range(2):
        for t in range(3):
            if MASK[i][t]:
                d = ref[i, t].item() - LOGP[i][t]
                kl = math.exp(d) - d - 1
                kl_total += kl
                total += pt[i][t] + 0.04 * kl
    assert res.loss.item() == pytest.approx(total / 5, abs=1e-12)
    assert res.kl.item() == pytest.approx(kl_total / 5, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_batch(loss_type):
    g = torch.Generator().manual_seed(0)
    B, C = 6, 5
    logps = -torch.rand(B, C, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, C, generator=g) > 0.3
    mask[:, 0] = True
    whole = policy_loss(logps, old, adv, mask, loss_type=loss_type, max_completion_length=8).loss
    tokens = int(mask.sum())
    parts = sum(
        policy_loss(
            logps[s],
            old[s],
            adv[s],
            mask[s],
            loss_type=loss_type,
            max_completion_length=8,
            num_sequences=B,
            num_tokens=tokens,
        ).loss
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    )
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)


def test_num_iterations_one_gradient_is_reinforce():
    """With old = logp.detach() the ratio is 1 and ∂loss/∂logp = −A / n_i (grpo): the plain policy gradient."""
    logps, _, adv, mask = _tensors()
    policy_loss(logps, logps.detach(), adv, mask).loss.backward()
    want = [[-1.0 / 2 / 2, -1.0 / 2 / 2, 0.0], [2.0 / 3 / 2] * 3]
    assert logps.grad.tolist() == [pytest.approx(r, abs=1e-12) for r in want]


def test_policy_loss_bad_input():
    logps, old, adv, mask = _tensors()
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(logps, old[:1], adv, mask)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logps, old, adv, mask, loss_type="bnpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, beta=0.1)
    with pytest.raises(TypeError, match="completion_mask"):
        policy_loss(logps, old, adv, mask.long())
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, adv, mask, max_completion_length=2)


@pytest.mark.parametrize("seed", range(4))
def test_batch_scaling_divides_by_the_std_of_every_process(seed):
    """scale_rewards="batch" is TRL's: the std over the rewards of all processes. Each process here holds
    2 prompts × 4 rollouts of a 2-process step; with a gather that returns both processes' rewards (what
    `Accelerator.gather` does), each process's advantages equal its slice of the single-process computation over
    all 16 rewards, and they differ from the std of its own 8 alone."""
    g = torch.Generator().manual_seed(seed)
    everyone = torch.rand(2, 8, generator=g, dtype=torch.float64) * (1 + torch.arange(2.0)[:, None])  # [procs, N]
    whole = group_advantages(everyone.reshape(-1), 4, "batch")  # [16]
    for rank in range(2):

        def gather(t, rank=rank):
            return torch.cat([t if i == rank else everyone[i] for i in range(2)])

        got = group_advantages(everyone[rank], 4, "batch", gather=gather)
        torch.testing.assert_close(got, whole[rank * 8 : (rank + 1) * 8], rtol=1e-12, atol=1e-12)
        alone = group_advantages(everyone[rank], 4, "batch")
        assert not torch.allclose(alone, got), "the per-process std would give the same advantages"
    # "group" needs no other process: a gather is never called.
    torch.testing.assert_close(
        group_advantages(everyone[0], 4, "group", gather=lambda t: 1 / 0), group_advantages(everyone[0], 4, "group")
    )
