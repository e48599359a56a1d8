"""GRPO's group-relative advantages and clipped policy loss, with TRL's names for the shared settings.

Rollouts come in groups: `num_generations` consecutive rows share one prompt. Given one scalar reward per rollout,

    advantage_i = r_i − mean(group of i)                        then, by `scale_rewards`:
        "group":  / (std(group of i) + 1e-4)     "batch": / (std(all rewards) + 1e-4)     "none": as is

(std unbiased, as TRL's). "all rewards" are those of every process: pass `gather` (e.g. accelerate's
`Accelerator.gather`), which concatenates a tensor across processes; the group means need none, since each
process holds whole groups. The per-token loss of rollout i at completion token t is

    ρ = exp(logp − old_logp),   ℓ = −min(ρ·A_i, clip(ρ, 1 − epsilon, 1 + epsilon_high)·A_i) + beta·KL_t
    KL_t = exp(ref_logp − logp) − (ref_logp − logp) − 1          (the k3 estimator; only when beta > 0)

and `loss_type` aggregates the masked ℓ over a batch of B rollouts:

    "grpo":    mean over rollouts of (Σ_t ℓ / n_i)            n_i = completion tokens of rollout i
    "dr_grpo": Σ_{i,t} ℓ / (B · max_completion_length)
    "dapo":    Σ_{i,t} ℓ / Σ_i n_i                            (tokens of the whole batch, all processes)

A batch may be split into micro-batches (gradient accumulation) or across processes: pass the totals of the
whole batch (`num_sequences`, `num_tokens`) and each part returns its share, so that the parts' losses add up to
the loss of the whole batch for every loss_type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["SCALE_REWARDS", "LOSS_TYPES", "group_advantages", "PolicyLoss", "policy_loss"]

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL's guard against a group whose rewards are all equal


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Advantages float [N] of N = prompts × num_generations rewards [N] (rows of one prompt are consecutive).

    gather: tensor [N] -> the tensors of every process concatenated (for "batch"); None: this process is alone."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        got = f"{tuple(rewards.shape)} {rewards.dtype}" if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"group_advantages: rewards must be a 1D floating-point tensor, got {got}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"group_advantages: num_generations must be an int >= 1, got {num_generations!r}")
    if rewards.numel() % num_generations:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of num_generations={num_generations}"
        )
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"group_advantages: scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"group_advantages: rewards must be finite, got {rewards.tolist()}")
    groups = rewards.view(-1, num_generations)  # [P, G]
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)  # [N]
    if scale_rewards == "none":
        return centred
    if num_generations == 1 and scale_rewards == "group":
        raise ValueError("group_advantages: scale_rewards='group' needs num_generations >= 2 (a std over one value)")
    if scale_rewards == "group":
        std = groups.std(dim=1).repeat_interleave(num_generations)  # [N]
    else:
        everyone = rewards if gather is None else gather(rewards).to(rewards.device, rewards.dtype)  # [N·procs]
        if everyone.numel() < 2:
            raise ValueError("group_advantages: scale_rewards='batch' needs at least 2 rewards")
        std = everyone.std().expand_as(rewards)  # [N]
    return centred / (std + STD_EPS)


@dataclass
class PolicyLoss:
    """What `policy_loss` returns: the loss to back-propagate and detached statistics for the logs."""

    loss: torch.Tensor  # scalar, this part's share of the batch loss
    clip_low: torch.Tensor  # scalar: tokens whose ratio fell below 1 − epsilon with A < 0 (so clipped), / tokens
    clip_high: torch.Tensor  # scalar: ratio above 1 + epsilon_high with A > 0, / tokens
    kl: Optional[torch.Tensor]  # scalar mean KL per completion token, None when beta == 0


def _check_tensor(name: str, t, shape, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"policy_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"policy_loss: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"policy_loss: {name} must be floating point, got {t.dtype}")
    return t


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "grpo",
    beta: float = 0.0,
    ref_logps: Optional[torch.Tensor] = None,
    max_completion_length: Optional[int] = None,
    num_sequences: Optional[int] = None,
    num_tokens: Optional[float] = None,
) -> PolicyLoss:
    """The clipped GRPO loss of B rollouts (see the module docstring).

    Args:
        logps: float [B, C] log-probabilities of the completion tokens under the policy (with grad).
        old_logps: float [B, C] the same under the policy that sampled them (detached); with
            num_iterations = 1 pass `logps.detach()`.
        advantages: float [B], from `group_advantages`.
        completion_mask: bool [B, C], the completion tokens (up to and including the end-of-sequence token).
        epsilon, epsilon_high: the clip range [1 − epsilon, 1 + epsilon_high]; epsilon_high defaults to epsilon.
        loss_type: "grpo", "dr_grpo" or "dapo".
        beta: weight of the KL to the reference policy; needs ref_logps [B, C] when > 0.
        max_completion_length: the generation budget C_max ("dr_grpo" divides by B·C_max); defaults to C.
        num_sequences: rollouts in the whole batch when this is a part of it (defaults to B).
        num_tokens: completion tokens in the whole batch, for "dapo" (defaults to this part's count).
    """
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2:
        got = tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__
        raise ValueError(f"policy_loss: logps must be a [B, C] tensor, got {got}")
    B, C = logps.shape
    _check_tensor("logps", logps, (B, C))
    _check_tensor("old_logps", old_logps, (B, C))
    _check_tensor("advantages", advantages, (B,))
    _check_tensor("completion_mask", completion_mask, (B, C), floating=False)
    if completion_mask.dtype != torch.bool:
        raise TypeError(f"policy_loss: completion_mask must be bool, got {completion_mask.dtype}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"policy_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high), ("beta", beta)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"policy_loss: {name} must be a float >= 0, got {value!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logps (the reference policy's log-probabilities)")
    if ref_logps is not None:
        _check_tensor("ref_logps", ref_logps, (B, C))
    eps_high = epsilon if epsilon_high is None else epsilon_high
    max_len = C if max_completion_length is None else int(max_completion_length)
    if max_len < C:
        raise ValueError(f"policy_loss: max_completion_length={max_len} is shorter than the completions ({C})")
    n_seq = B if num_sequences is None else int(num_sequences)
    if n_seq < B:
        raise ValueError(f"policy_loss: num_sequences={n_seq} is smaller than this part's {B} rollouts")

    mask = completion_mask.to(logps.dtype)  # [B, C]
    adv = advantages.to(logps.dtype)[:, None]  # [B, 1]
    ratio = torch.exp(logps - old_logps)  # [B, C]
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)  # [B, C]
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, C]
    kl = None
    if beta > 0:
        delta = ref_logps - logps  # [B, C]
        per_token_kl = torch.exp(delta) - delta - 1.0  # [B, C]
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl.detach() * mask).sum() / mask.sum().clamp(min=1.0)

    masked = per_token * mask  # [B, C]
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (n_seq * max_len)
    else:
        tokens = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens), dtype=logps.dtype)
        loss = masked.sum() / tokens.clamp(min=1.0)

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        low = ((ratio < 1.0 - epsilon) & (adv < 0)).to(logps.dtype)  # [B, C]
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logps.dtype)  # [B, C]
        clip_low = (low * mask).sum() / n
        clip_high = (high * mask).sum() / n
    return PolicyLoss(loss=loss, clip_low=clip_low, clip_high=clip_high, kl=kl)
