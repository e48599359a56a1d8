"""The CUDA kernels against the float64 reference, over the whole shared case grid, in bf16 and fp16.

Tolerances come from avar_ops.testing: our error may be a small multiple of PyTorch's own error at the same
precision (plain PyTorch ops on the same low-precision inputs, on the same GPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import avar_ops
from avar_ops.core import extension as _extension
from avar_ops.core import NUM_GROUPS, attention_reference, key_mass_reference
from avar_ops.core.testing import (
    LOWP_FWD_FACTOR,
    LOWP_GRAD_FACTOR,
    LOWP_LSE_ABS,
    lowp_bound,
    lowp_table_bound,
    max_abs_err,
    rel_err,
    torch_lowp_attention,
    torch_lowp_key_mass,
)
from cases import CASES, Case, make_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]

# Long key caches with few query rows: these take the split-KV (flash-decoding) path.
DECODE_CASES = [
    Case("decode_split_L1", batch=1, len_q=1, len_k=3000, heads=8, kv_heads=2, head_dim=128),
    Case("decode_split_L4_d80", batch=2, len_q=4, len_k=2500, heads=4, kv_heads=1, head_dim=80, logit_scale="random"),
    Case("decode_split_masked_keys", batch=1, len_q=3, len_k=1200, heads=4, kv_heads=4, groups="dead_rows"),
    Case("decode_split_varlen", varlen=(1, 2, 1), len_k=1500, heads=4, kv_heads=1, head_dim=64),
]


def _upcast(kw, requires_grad=False):
    """The same inputs in float64 (fresh leaves), for the reference."""
    out = dict(kw)
    for name in ("q", "k", "v", "bias", "logit_scale"):
        t = kw.get(name)
        if t is not None:
            out[name] = t.detach().to(torch.float64).requires_grad_(requires_grad)
    return out


def _sequences(kw):
    cq, ck = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _lowp_attention(kw):
    """PyTorch's own low-precision attention on the same inputs (out like q, mass float32 like ours)."""
    args = dict(key_group=kw.get("key_group"), bias=kw.get("bias"), logit_scale=kw.get("logit_scale"),
                causal=kw["causal"])
    q, k, v = kw["q"], kw["k"], kw["v"]
    if kw.get("cu_seqlens_q") is None:
        out, mass = torch_lowp_attention(q, k, v, **args)
        return out, mass.float()
    Tq, H, _ = q.shape
    out = torch.zeros_like(q)  # [Tq, H, D]
    mass = q.new_zeros(H, Tq, NUM_GROUPS, dtype=torch.float32)  # [H, Tq, G]
    for q0, q1, k0, k1 in _sequences(kw):
        if q1 == q0:
            continue
        kg = None if args["key_group"] is None else args["key_group"][k0:k1][None]
        o, m = torch_lowp_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], kg, args["bias"],
                                    args["logit_scale"], causal=args["causal"])
        rows = torch.arange(q0, q1, device=q.device)
        out = out.index_copy(0, rows, o[0])
        mass = mass.index_copy(1, rows, m[0].float())
    return out, mass


def _lowp_key_mass(kw, w):
    args = dict(key_group=kw.get("key_group"), bias=kw.get("bias"), logit_scale=kw.get("logit_scale"),
                causal=kw["causal"])
    q, k = kw["q"], kw["k"]
    if kw.get("cu_seqlens_q") is None:
        return torch_lowp_key_mass(q, k, w, **args).float()
    result = q.new_zeros(q.shape[1], k.shape[0], dtype=torch.float32)  # [H, Tk]
    for q0, q1, k0, k1 in _sequences(kw):
        if q1 == q0 or k1 == k0:
            continue
        kg = None if args["key_group"] is None else args["key_group"][k0:k1][None]
        km = torch_lowp_key_mass(q[None, q0:q1], k[None, k0:k1], w[None, :, q0:q1], kg, args["bias"],
                                 args["logit_scale"], causal=args["causal"])
        result[:, k0:k1] = km[0].float()
    return result


def _check_lse(ours: torch.Tensor, ref: torch.Tensor):
    dead_ours, dead_ref = torch.isneginf(ours), torch.isneginf(ref)
    assert torch.equal(dead_ours, dead_ref), "rows with no visible key must have lse = -inf, and only those"
    alive = ~dead_ref
    assert torch.isfinite(ours[alive]).all()
    err = max_abs_err(ours[alive], ref[alive])
    assert err <= LOWP_LSE_ABS, f"lse max abs error {err:.3g} > {LOWP_LSE_ABS}"


def _check_forward(kw, dtype, return_mass=True):
    ours = avar_ops.attention(**kw, return_mass=return_mass)
    ref = attention_reference(**_upcast(kw), return_mass=True)
    torch_out, torch_mass = _lowp_attention(kw)

    assert torch.isfinite(ours.out).all(), "out has non-finite values"
    bound = lowp_bound(rel_err(torch_out, ref.out), dtype, LOWP_FWD_FACTOR)
    err = rel_err(ours.out, ref.out)
    assert err <= bound, f"out rel error {err:.3g} > {bound:.3g}"
    _check_lse(ours.lse, ref.lse)
    if return_mass:
        assert torch.isfinite(ours.mass).all(), "mass has non-finite values"
        bound = lowp_bound(max_abs_err(torch_mass, ref.mass), dtype, LOWP_FWD_FACTOR)
        err = max_abs_err(ours.mass, ref.mass)
        assert err <= bound, f"mass max abs error {err:.3g} > {bound:.3g}"
    else:
        assert ours.mass is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward(case, dtype):
    _check_forward(make_inputs(case, dtype, "cuda", seed=1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("L1025_gqa7_d128", "varlen_ragged", "dead_rows")],
                         ids=lambda c: c.name)
def test_forward_without_mass(case, dtype):
    _check_forward(make_inputs(case, dtype, "cuda", seed=3), dtype, return_mass=False)


def _decode_splits(case: Case) -> int:
    lens_q = case.varlen if case.varlen is not None else (case.len_q,)
    max_q = max(lens_q)
    max_k = max(lq + case.lk for lq in lens_q) if case.varlen is not None else case.lk
    batch = len(lens_q) if case.varlen is not None else case.batch
    return _extension.load_extension().cuda_decode_splits(batch, case.heads, max_q, max_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_decode_split_path(case, dtype):
    assert _decode_splits(case) > 1, "this case is meant to exercise the split-KV path"
    _check_forward(make_inputs(case, dtype, "cuda", seed=4), dtype)


def _grad_leaves(kw):
    return [(name, kw[name]) for name in ("q", "k", "v", "bias", "logit_scale") if kw.get(name) is not None]


def _check_backward(kw, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    names, leaves = zip(*_grad_leaves(kw))

    ours = avar_ops.attention(**kw, return_mass=True)
    d_out = torch.randn(ours.out.shape, generator=gen, device="cuda").to(dtype)  # like out
    d_mass = torch.randn(ours.mass.shape, generator=gen, device="cuda")  # [B, H, Lq, G] | [H, Tq, G]
    loss = (ours.out.float() * d_out.float()).sum() + (ours.mass * d_mass).sum()
    grads = torch.autograd.grad(loss, leaves)

    kw64 = _upcast(kw, requires_grad=True)
    ref = attention_reference(**kw64, return_mass=True)
    ref_loss = (ref.out * d_out.double()).sum() + (ref.mass * d_mass.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, [kw64[n] for n in names])

    t_out, t_mass = _lowp_attention(kw)
    t_loss = (t_out.float() * d_out.float()).sum() + (t_mass * d_mass).sum()
    t_grads = torch.autograd.grad(t_loss, leaves)

    for name, g, r, t in zip(names, grads, ref_grads, t_grads):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        if name in ("bias", "logit_scale"):
            bound = lowp_table_bound(max_abs_err(t, r), r, dtype)
            err = max_abs_err(g, r)
            assert err <= bound, f"d{name} max abs error {err:.3g} > {bound:.3g}"
        else:
            bound = lowp_bound(rel_err(t, r), dtype, LOWP_GRAD_FACTOR)
            err = rel_err(g, r)
            assert err <= bound, f"d{name} rel error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backward(case, dtype):
    _check_backward(make_inputs(case, dtype, "cuda", seed=2, requires_grad=True), dtype, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_key_mass(case, dtype):
    kw = make_inputs(case, dtype, "cuda", seed=6)
    fwd = avar_ops.attention(**kw)
    gen = torch.Generator(device="cuda").manual_seed(7)
    w = torch.rand(fwd.lse.shape, generator=gen, device="cuda")  # [B, H, Lq] | [H, Tq]
    extra = {n: kw[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") if n in kw}
    common = dict(key_group=kw.get("key_group"), bias=kw.get("bias"), logit_scale=kw.get("logit_scale"),
                  causal=kw["causal"])
    ours = avar_ops.attention_key_mass(kw["q"], kw["k"], fwd.lse, w, **common, **extra)
    kw64 = _upcast(kw)
    ref = key_mass_reference(kw64["q"], kw64["k"], w, key_group=kw.get("key_group"), bias=kw64.get("bias"),
                             logit_scale=kw64.get("logit_scale"), causal=kw["causal"],
                             cu_seqlens_q=kw.get("cu_seqlens_q"), cu_seqlens_k=kw.get("cu_seqlens_k"))
    theirs = _lowp_key_mass(kw, w)
    assert torch.isfinite(ours).all()
    bound = lowp_bound(rel_err(theirs, ref), dtype, LOWP_FWD_FACTOR)
    err = rel_err(ours, ref)
    assert err <= bound, f"key mass rel error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument.

def test_rejects_fp32_on_cuda():
    kw = make_inputs(CASES[1], torch.float32, "cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        avar_ops.attention(**kw)


def test_rejects_head_dim_96():
    kw = make_inputs(dataclasses.replace(CASES[1], head_dim=96), torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="head dim 96"):
        avar_ops.attention(**kw)


def test_rejects_misaligned_stride():
    B, L, H, D = 2, 33, 4, 64
    q = torch.randn(B, L, H, D + 1, device="cuda", dtype=torch.bfloat16)[..., :D]  # head stride D + 1
    k = torch.randn(B, L, 1, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, L, 1, D, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q must be 16-byte aligned"):
        avar_ops.attention(q, k, v)


def test_rejects_misaligned_pointer():
    B, L, Hkv, D = 2, 33, 1, 64
    q = torch.randn(B, L, 4, D, device="cuda", dtype=torch.bfloat16)
    flat = torch.randn(B * L * Hkv * D + 1, device="cuda", dtype=torch.bfloat16)
    k = flat[1:].view(B, L, Hkv, D)  # data pointer 2 bytes past an aligned address
    v = torch.randn(B, L, Hkv, D, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="k must be 16-byte aligned"):
        avar_ops.attention(q, k, v)
