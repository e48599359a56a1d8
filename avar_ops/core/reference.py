"""The pure-PyTorch reference of the avar attention op: materialises P, works in float64, differentiable.

Tests, benchmarks and anything that needs ground truth use these functions (and nothing else) as the
definition of what the kernels compute (docs/design.md, "The op"):

    s_ij   = scale · q_i·k_j · γ[h, g(j)] + β[h, g(j)]     (−inf if g(j) = −1 or j is causally hidden)
    P_ij   = softmax_j(s_ij),  O_i = Σ_j P_ij v_j,  LSE_i = log Σ_j exp(s_ij),  mass_i[g] = Σ_{g(j)=g} P_ij

A row with no visible key gives O = 0, LSE = −inf, mass = 0 (and zero gradients), never NaN.
"""

from __future__ import annotations

from typing import Optional

import torch

from avar_ops.core.constants import NUM_GROUPS
from avar_ops.core.ops import AttentionOutput

__all__ = ["attention_reference", "key_mass_reference"]


def _group_table(t: Optional[torch.Tensor], heads: int, fill: float, device) -> torch.Tensor:
    if t is None:
        return torch.full((heads, NUM_GROUPS), fill, dtype=torch.float64, device=device)
    t = t.to(torch.float64)
    return t.expand(heads, NUM_GROUPS) if t.dim() == 1 else t


def _probabilities(
    q: torch.Tensor,  # [B, Lq, H, D]
    k: torch.Tensor,  # [B, Lk, Hkv, D]
    key_group: Optional[torch.Tensor],  # [B, Lk]
    bias: Optional[torch.Tensor],
    logit_scale: Optional[torch.Tensor],
    scale: float,
    causal: bool,
):
    """P [B, H, Lq, Lk], LSE [B, H, Lq] and the key-group one-hot [B, Lk, G], all float64."""
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    q64 = q.to(torch.float64).transpose(1, 2)  # [B, H, Lq, D]
    k64 = k.to(torch.float64).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    groups = (
        key_group.to(torch.long)
        if key_group is not None
        else torch.zeros(B, Lk, dtype=torch.long, device=q.device)
    )  # [B, Lk]
    visible_group = groups >= 0  # [B, Lk]
    g_idx = groups.clamp(min=0)  # [B, Lk]
    gamma = _group_table(logit_scale, H, 1.0, q.device)[:, g_idx].permute(1, 0, 2)  # [B, H, Lk]
    beta = _group_table(bias, H, 0.0, q.device)[:, g_idx].permute(1, 0, 2)  # [B, H, Lk]

    raw = scale * (q64 @ k64.transpose(-1, -2))  # [B, H, Lq, Lk]
    s = raw * gamma[:, :, None, :] + beta[:, :, None, :]
    visible = visible_group[:, None, None, :].expand(B, 1, Lq, Lk)  # [B, 1, Lq, Lk]
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        visible = visible & (j <= i + (Lk - Lq))
    s = s.masked_fill(~visible, float("-inf"))
    alive = visible.any(dim=-1)  # [B, 1, Lq]
    # Dead rows take a finite stand-in so that neither logsumexp nor its gradient sees −inf − (−inf).
    s_safe = torch.where(alive[..., None], s, torch.zeros_like(s))
    lse = torch.logsumexp(s_safe, dim=-1)  # [B, H, Lq]
    p = torch.exp(s - torch.where(alive, lse, torch.zeros_like(lse))[..., None])  # [B, H, Lq, Lk]
    lse = torch.where(alive, lse, torch.full_like(lse, float("-inf")))
    onehot = torch.nn.functional.one_hot(g_idx, NUM_GROUPS).to(torch.float64) * visible_group[..., None]
    return p, lse, onehot  # onehot [B, Lk, G]


def _dense(q, k, v, key_group, bias, logit_scale, scale, causal, return_mass):
    H, Hkv = q.shape[2], k.shape[2]
    p, lse, onehot = _probabilities(q, k, key_group, bias, logit_scale, scale, causal)
    v64 = v.to(torch.float64).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    out = (p @ v64).transpose(1, 2)  # [B, Lq, H, D]
    mass = (p @ onehot[:, None]) if return_mass else None  # [B, H, Lq, G]
    return out, lse, mass


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_group: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    logit_scale: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_mass: bool = False,
) -> AttentionOutput:
    """Same signature and meaning as `avar_ops.attention`; every output is float64."""
    del max_seqlen_q, max_seqlen_k  # the reference reads the lengths from cu_seqlens
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens_q is None:
        out, lse, mass = _dense(q, k, v, key_group, bias, logit_scale, scale, causal, return_mass)
        return AttentionOutput(out, lse, mass)

    Tq, H, D = q.shape
    out = q.new_zeros(Tq, H, D, dtype=torch.float64)  # [Tq, H, D]
    lse = q.new_full((H, Tq), float("-inf"), dtype=torch.float64)  # [H, Tq]
    mass = q.new_zeros(H, Tq, NUM_GROUPS, dtype=torch.float64) if return_mass else None  # [H, Tq, G]
    outs, lses, masses, rows = [], [], [], []
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0:
            continue
        kg = key_group[k0:k1][None] if key_group is not None else None
        o, l, m = _dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], kg, bias, logit_scale, scale, causal,
                         return_mass)
        outs.append(o[0])
        lses.append(l[0])
        masses.append(m[0] if return_mass else None)
        rows.append(torch.arange(q0, q1, device=q.device))
    if rows:
        idx = torch.cat(rows)
        out = out.index_copy(0, idx, torch.cat(outs))
        lse = lse.index_copy(1, idx, torch.cat(lses, dim=1))
        if return_mass:
            mass = mass.index_copy(1, idx, torch.cat(masses, dim=1))
    return AttentionOutput(out, lse, mass)


def key_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    query_weight: torch.Tensor,
    key_group: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    logit_scale: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention received per key, Σ_i w_i · P_ij: [B, H, Lk] (varlen [H, Tk]), float64.

    query_weight is [B, H, Lq] or [B, Lq] (varlen [H, Tq] or [Tq]).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    H = q.shape[-2]

    def dense(qb, kb, kg, w):  # w [B, H, Lq]
        p, _, _ = _probabilities(qb, kb, kg, bias, logit_scale, scale, causal)
        return torch.einsum("bhi,bhij->bhj", w.to(torch.float64), p)  # [B, H, Lk]

    if cu_seqlens_q is None:
        w = query_weight if query_weight.dim() == 3 else query_weight[:, None].expand(-1, H, -1)
        return dense(q, k, key_group, w)

    w = query_weight if query_weight.dim() == 2 else query_weight[None].expand(H, -1)  # [H, Tq]
    result = q.new_zeros(H, k.shape[0], dtype=torch.float64)  # [H, Tk]
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue
        kg = key_group[k0:k1][None] if key_group is not None else None
        result[:, k0:k1] = dense(q[None, q0:q1], k[None, k0:k1], kg, w[None, :, q0:q1])[0]
    return result
