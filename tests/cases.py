"""The test grid shared by the forward, backward, key-mass and CUDA tests: one list of problem shapes and
one way to draw fresh random inputs for them."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from avar_ops.core import NUM_GROUPS, attention_key_mass, key_mass_reference


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    len_q: int = 17
    len_k: Optional[int] = None  # None: same as len_q
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64
    causal: bool = True
    groups: str = "random"  # "none" | "random" (with -1) | "one" (all keys one group) | "dead_rows"
    bias: str = "random"  # "none" | "zero" | "random" | "shared" ([G] table)
    logit_scale: str = "none"  # "none" | "one" | "random" | "shared"
    varlen: Optional[tuple] = None  # (len_q per sequence) ; keys: same lengths + extra_k

    @property
    def lk(self) -> int:
        return self.len_q if self.len_k is None else self.len_k


# The forward issue's grid: L in {1, 17, 113, 1025}, B > 1, GQA 1/4/7, D 64/80/128, causal and not, Lq < Lk,
# ragged varlen, groups absent / present / all one group, rows with no visible key, bias and logit_scale
# trivial and not.
CASES = [
    Case("L1", len_q=1, heads=4, kv_heads=4),
    Case("L17_gqa4_d64", len_q=17, heads=4, kv_heads=1),
    Case("L113_gqa7_d80", len_q=113, heads=7, kv_heads=1, head_dim=80, logit_scale="random"),
    Case("L113_gqa1_d128_noncausal", len_q=113, heads=3, kv_heads=3, head_dim=128, causal=False),
    Case("L1025_gqa7_d128", batch=1, len_q=1025, heads=14, kv_heads=2, head_dim=128, logit_scale="random"),
    Case("decode_Lq_lt_Lk", len_q=5, len_k=300, heads=8, kv_heads=2, head_dim=64),
    Case("Lq_lt_Lk_noncausal", len_q=40, len_k=97, heads=4, kv_heads=2, head_dim=80, causal=False),
    Case("groups_none", len_q=65, groups="none", bias="none"),
    Case("groups_one", len_q=65, groups="one", bias="random", logit_scale="shared"),
    Case("dead_rows", len_q=50, groups="dead_rows", heads=4, kv_heads=2),
    Case("bias_zero_scale_one", len_q=33, bias="zero", logit_scale="one"),
    Case("bias_shared", len_q=70, bias="shared", logit_scale="random", head_dim=80),
    Case("varlen_ragged", varlen=(1, 17, 0, 130, 64), heads=7, kv_heads=1, head_dim=128, logit_scale="random"),
    Case("varlen_noncausal", varlen=(33, 5, 77), heads=4, kv_heads=2, head_dim=64, causal=False),
    Case("varlen_decode", varlen=(3, 1, 8), len_k=50, heads=4, kv_heads=4, head_dim=80),
    # Every sequence empty, padded rows present (cu_seqlens_q = [0, 0], Tq = 3): nothing to launch at all.
    Case("varlen_all_empty", varlen=(0,), heads=4, kv_heads=2, head_dim=64),
]

SMALL_CASES = [c for c in CASES if c.len_q * c.lk <= 130 * 130 and c.batch * c.len_q <= 300]


def _table(kind: str, heads: int, gen: torch.Generator, fill: float):
    if kind == "none":
        return None
    if kind in ("zero", "one"):
        return torch.full((heads, NUM_GROUPS), fill)
    t = torch.randn(heads, NUM_GROUPS, generator=gen)
    if kind == "shared":
        t = t[0]
    # logit scales around 1 (some above, some below, one negative); biases of a few units.
    return (1.0 + 0.4 * t) if fill == 1.0 else 1.5 * t


def _groups(kind: str, shape, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "one":
        return torch.full(shape, 1, dtype=torch.int8)
    g = torch.randint(-1, NUM_GROUPS, shape, generator=gen).to(torch.int8)
    if kind == "dead_rows":
        # The first keys are masked: early queries of a causal mask see nothing at all.
        g[..., :7] = -1
    return g


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    """Fresh random inputs for `case`: a dict of keyword arguments for avar_ops.attention (and the reference)."""
    gen = torch.Generator().manual_seed(seed)
    H, Hkv, D = case.heads, case.kv_heads, case.head_dim
    kwargs = {}
    if case.varlen is not None:
        lens_q = list(case.varlen)
        extra = 0 if case.len_k is None else case.len_k
        lens_k = [lq + extra for lq in lens_q]
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
        # A few rows past the last sequence: they must stay untouched by attention (zero out, -inf lse).
        Tq, Tk = int(cu_q[-1]) + 3, int(cu_k[-1]) + 2
        q = torch.randn(Tq, H, D, generator=gen)
        k = torch.randn(Tk, Hkv, D, generator=gen)
        v = torch.randn(Tk, Hkv, D, generator=gen)
        kg = _groups(case.groups, (Tk,), gen)
        kwargs.update(
            cu_seqlens_q=cu_q.to(device),
            cu_seqlens_k=cu_k.to(device),
            max_seqlen_q=max(lens_q),
            max_seqlen_k=max(lens_k),
        )
    else:
        B, Lq, Lk = case.batch, case.len_q, case.lk
        # Non-contiguous BSHD views (as HF hands over [B, H, L, D] tensors) with a contiguous last dim.
        q = torch.randn(B, H, Lq, D, generator=gen).transpose(1, 2)
        k = torch.randn(B, Hkv, Lk, D, generator=gen).transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, D, generator=gen)
        kg = _groups(case.groups, (B, Lk), gen)
    bias = _table(case.bias, H, gen, 0.0)
    logit_scale = _table(case.logit_scale, H, gen, 1.0)

    def table(t):  # bias and logit_scale are float32 whatever the input dtype
        return None if t is None else t.to(device=device, dtype=torch.float32).requires_grad_(requires_grad)

    # q, k, v keep their strides (a plain .to() would make the transposed views contiguous).
    def prep_qkv(t):
        out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device)
        out.copy_(t)
        return out.requires_grad_(requires_grad)

    kwargs.update(
        q=prep_qkv(q),
        k=prep_qkv(k),
        v=prep_qkv(v),
        key_group=kg.to(device) if kg is not None else None,
        bias=table(bias),
        logit_scale=table(logit_scale),
        causal=case.causal,
    )
    return kwargs


# ---------------------------------------------------------------------------------------------------------
# The ops called with a make_inputs dict: the raw dispatcher arguments (opcheck) and the public key-mass calls.


def fwd_op_args(kw, return_mass=True) -> tuple:
    """Positional arguments of torch.ops.avar.attention_fwd."""
    return (
        kw["q"],
        kw["k"],
        kw["v"],
        kw["key_group"],
        kw["bias"],
        kw["logit_scale"],
        kw["q"].shape[-1] ** -0.5,
        kw["causal"],
        kw.get("cu_seqlens_q"),
        kw.get("cu_seqlens_k"),
        kw.get("max_seqlen_q", 0),
        kw.get("max_seqlen_k", 0),
        return_mass,
    )


def key_mass_op_args(kw, lse, w) -> tuple:
    """Positional arguments of torch.ops.avar.attention_key_mass."""
    q, k, _, group, bias, logit_scale, *rest = fwd_op_args(kw)
    return (q, k, lse, w, group, bias, logit_scale, *rest[:-1])


def key_mass_of(kw, lse, w):
    """avar_ops.attention_key_mass with the options of kw."""
    return attention_key_mass(
        kw["q"],
        kw["k"],
        lse,
        w,
        kw["key_group"],
        kw["bias"],
        logit_scale=kw["logit_scale"],
        causal=kw["causal"],
        cu_seqlens_q=kw.get("cu_seqlens_q"),
        cu_seqlens_k=kw.get("cu_seqlens_k"),
        max_seqlen_q=kw.get("max_seqlen_q"),
        max_seqlen_k=kw.get("max_seqlen_k"),
    )


def key_mass_reference_of(kw, w):
    """The float64 key-mass reference with the options of kw."""
    return key_mass_reference(
        kw["q"],
        kw["k"],
        w,
        kw["key_group"],
        kw["bias"],
        logit_scale=kw["logit_scale"],
        causal=kw["causal"],
        cu_seqlens_q=kw.get("cu_seqlens_q"),
        cu_seqlens_k=kw.get("cu_seqlens_k"),
    )
