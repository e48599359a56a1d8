"""Python face of the avar ops: the public `attention` function, fake (meta) kernels and autograd.

The kernels live in the extension (`torch.ops.avar.*`, registered by `avar_ops._C`); this module only
adds what the dispatcher needs from Python: shape inference for torch.compile and the backward formula
(which is itself a kernel, `torch.ops.avar.attention_bwd`). The extension is loaded, and these registered,
on the first call (or by `ensure_loaded()`), so that importing avar_ops needs no build.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from typing import NamedTuple

from avar_ops.core.constants import NUM_GROUPS
from avar_ops.core.extension import load_extension

__all__ = ["attention", "attention_key_mass", "AttentionOutput", "ensure_loaded"]


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # like q
    lse: torch.Tensor  # [B, H, Lq] | [H, Tq], float32 (kernels) or float64 (reference)
    mass: Optional[torch.Tensor]  # [B, H, Lq, G] | [H, Tq, G], or None when not asked


def _lse_shape(q: torch.Tensor, varlen: bool):
    if varlen:
        return (q.shape[1], q.shape[0])  # [H, Tq]
    return (q.shape[0], q.shape[2], q.shape[1])  # [B, H, Lq]


def _check_fake_devices(q, **tensors):
    """The C++ checks do not run while tracing; a device mix-up must still fail there, not at run time."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"avar.attention: {name} must be on the same device as q ({q.device}), got {t.device}")


def _attention_fwd_fake(q, k, v, key_group, bias, logit_scale, scale, causal, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, return_mass):
    _check_fake_devices(q, k=k, v=v, key_group=key_group, bias=bias, logit_scale=logit_scale,
                        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    varlen = cu_seqlens_q is not None
    lse_shape = _lse_shape(q, varlen)
    out = q.new_empty(q.shape)
    lse = q.new_empty(lse_shape, dtype=torch.float32)
    mass = q.new_empty((*lse_shape, NUM_GROUPS) if return_mass else (0,), dtype=torch.float32)
    return out, lse, mass


def _attention_bwd_fake(dout, dmass, dlse, q, k, v, out, lse, mass, key_group, bias, logit_scale, scale, causal,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, need_dbias, need_dlogit_scale):
    heads = q.shape[-2]
    table = (heads, NUM_GROUPS)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(table if need_dbias else (0,), dtype=torch.float32),
        q.new_empty(table if need_dlogit_scale else (0,), dtype=torch.float32),
    )


def _attention_key_mass_fake(q, k, lse, query_weight, key_group, bias, logit_scale, scale, causal, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is not None:
        return q.new_empty((q.shape[1], k.shape[0]), dtype=torch.float32)  # [H, Tk]
    return q.new_empty((q.shape[0], q.shape[2], k.shape[1]), dtype=torch.float32)  # [B, H, Lk]


def _setup_context(ctx, inputs, output):
    (q, k, v, key_group, bias, logit_scale, scale, causal, cu_q, cu_k, max_q, max_k, return_mass) = inputs
    out, lse, mass = output
    ctx.save_for_backward(q, k, v, out, lse, mass if return_mass else None, key_group, bias, logit_scale, cu_q, cu_k)
    ctx.scale, ctx.causal, ctx.max_q, ctx.max_k, ctx.return_mass = scale, causal, max_q, max_k, return_mass


def _fold_table(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """dbias / dlogit_scale come back per head [H, G] in float32; a shared [G] table gets their sum over heads."""
    grad = grad.to(like.dtype)
    return grad.sum(dim=0) if like.dim() == 1 else grad


def _backward(ctx, dout, dlse, dmass):
    q, k, v, out, lse, mass, key_group, bias, logit_scale, cu_q, cu_k = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dbias = bias is not None and needs[4]
    need_dlogit = logit_scale is not None and needs[5]
    if not (needs[0] or needs[1] or needs[2] or need_dbias or need_dlogit):
        return (None,) * 13
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias, dlogit = torch.ops.avar.attention_bwd(
        dout.contiguous(),
        dmass.contiguous() if (ctx.return_mass and dmass is not None) else None,
        dlse.contiguous() if dlse is not None else None,
        q, k, v, out, lse, mass, key_group, bias, logit_scale, ctx.scale, ctx.causal, cu_q, cu_k,
        ctx.max_q, ctx.max_k, need_dbias, need_dlogit,
    )
    return (
        dq if needs[0] else None,
        dk if needs[1] else None,
        dv if needs[2] else None,
        None,
        _fold_table(dbias, bias) if need_dbias else None,
        _fold_table(dlogit, logit_scale) if need_dlogit else None,
        None, None, None, None, None, None, None,
    )


_LOADED = False


@torch.compiler.assume_constant_result
def ensure_loaded() -> bool:
    """Load the extension and register the fake kernels and the autograd formula (once); returns True.

    Called by every public op; call it yourself before using `torch.ops.avar.*` directly. torch.compile runs it
    while tracing and keeps only its (constant) result, so the first call may happen inside a compiled function.
    """
    global _LOADED
    if not _LOADED:
        load_extension()
        torch.library.register_fake("avar::attention_fwd")(_attention_fwd_fake)
        torch.library.register_fake("avar::attention_bwd")(_attention_bwd_fake)
        torch.library.register_fake("avar::attention_key_mass")(_attention_key_mass_fake)
        torch.library.register_autograd("avar::attention_fwd", _backward, setup_context=_setup_context)
        _LOADED = True
    return True


def _check_public_args(q, scale, causal, return_mass, max_seqlen_q, max_seqlen_k):
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"avar.attention: q must be a torch.Tensor, got {type(q).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"avar.attention: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"avar.attention: scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"avar.attention: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_mass, bool):
        raise TypeError(f"avar.attention: return_mass must be a bool, got {type(return_mass).__name__}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
            raise ValueError(f"avar.attention: {name} must be a non-negative int or None, got {val!r}")


def attention(
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
    """Fused attention with per-(head, group) logit scale and bias, and per-group attention masses.

    Args:
        q: [B, Lq, H, D] (or varlen [Tq, H, D]); last dim contiguous, other strides free.
        k, v: [B, Lk, H_kv, D] (or varlen [Tk, H_kv, D]); H % H_kv == 0 (GQA).
        key_group: int8 [B, Lk] (or [Tk]): -1 masked, 0 other text, 1 visual, 2 system, 3 user text.
            None means every key is group 0.
        bias: float32 [H, 4] or [4], added to the logit of every key of that group.
        logit_scale: float32 [H, 4] or [4], multiplies the scaled score before the bias:
            s = scale · q·k · logit_scale[h, g] + bias[h, g].
        scale: defaults to D ** -0.5.
        causal: bottom-right aligned (query i sees key j iff j <= i + Lk - Lq).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] offsets for the varlen layout.
        return_mass: also return mass, the attention each query puts on each group.

    Returns:
        AttentionOutput(out like q, lse float32 [B, H, Lq] (varlen [H, Tq]),
                        mass float32 [B, H, Lq, 4] (varlen [H, Tq, 4]) or None).
    """
    _check_public_args(q, scale, causal, return_mass, max_seqlen_q, max_seqlen_k)
    ensure_loaded()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse, mass = torch.ops.avar.attention_fwd(
        q, k, v, key_group, bias, logit_scale, float(scale), causal, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q or 0, max_seqlen_k or 0, return_mass,
    )
    return AttentionOutput(out, lse, mass if return_mass else None)


def attention_key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    query_weight: torch.Tensor,
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
) -> torch.Tensor:
    """Attention each key receives, Σ_i w_i · P_ij, without storing P.

    lse is the forward's log-sum-exp for the same q, k, groups, bias and logit_scale. query_weight is
    float32 [B, H, Lq] or [B, Lq] (varlen [H, Tq] or [Tq]). Returns float32 [B, H, Lk] (varlen [H, Tk]).
    """
    _check_public_args(q, scale, causal, False, max_seqlen_q, max_seqlen_k)
    ensure_loaded()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.avar.attention_key_mass(
        q, k, lse, query_weight, key_group, bias, logit_scale, float(scale), causal, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q or 0, max_seqlen_k or 0,
    )
