"""Gradients of avar_ops.attention (the CPU backward kernel behind register_autograd): float64 gradcheck,
fp32 and bf16 against the float64 reference's autograd on the shared grid, opcheck, torch.compile, an
optimisation check, and bad input to attention_bwd."""

import os

import pytest
import torch
from cases import CASES, Case, fwd_op_args, make_inputs

import avar_ops
from avar_ops.core import NUM_GROUPS, reference, testing

DIFFERENTIABLE = ("q", "k", "v", "bias", "logit_scale")


def _grad_inputs(kw):
    names = [n for n in DIFFERENTIABLE if kw.get(n) is not None]
    return names, [kw[n] for n in names]


def _finite_lse(lse):
    """Rows with no visible key have lse = −inf (no gradient flows there); the loss sees them as 0."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _loss_weights(res, seed, with_lse=True):
    gen = torch.Generator().manual_seed(seed)
    w = {
        "out": torch.randn(res.out.shape, generator=gen, dtype=torch.float64),  # like q
        "mass": torch.randn(res.mass.shape, generator=gen, dtype=torch.float64),  # [B, H, Lq, G] | [H, Tq, G]
    }
    if with_lse:
        w["lse"] = torch.randn(res.lse.shape, generator=gen, dtype=torch.float64)  # [B, H, Lq] | [H, Tq]
    return w


def _loss(res, w):
    total = (res.out.double() * w["out"]).sum() + (res.mass.double() * w["mass"]).sum()
    if "lse" in w:
        total = total + (_finite_lse(res.lse).double() * w["lse"]).sum()
    return total


def _reference_grads(kw, w):
    """Autograd of the float64 reference on float64 copies of the inputs (exact, not rounded to q's dtype)."""
    kw64 = dict(kw)
    for n in DIFFERENTIABLE:
        if kw.get(n) is not None:
            kw64[n] = kw[n].detach().to(torch.float64).requires_grad_(True)
    names, leaves = _grad_inputs(kw64)
    ref = avar_ops.attention_reference(**kw64, return_mass=True)
    loss = _loss(ref, w)
    if not loss.requires_grad:  # every sequence empty: the outputs do not depend on the inputs
        return {n: torch.zeros_like(x) for n, x in zip(names, leaves)}
    return dict(zip(names, torch.autograd.grad(loss, leaves)))


def _our_grads(kw, w):
    names, leaves = _grad_inputs(kw)
    got = avar_ops.attention(**kw, return_mass=True)
    grads = torch.autograd.grad(_loss(got, w), leaves)
    for n, g in zip(names, grads):
        assert torch.isfinite(g).all(), f"non-finite gradient for {n}"
    return dict(zip(names, grads))


def _table_term_scale(kw, w):
    """Per-(head, group) sums of |dS| and |dS·scale·q·k| in float64: the size of the terms that dβ and dγ add up.

    dβ and dγ are sums over every score of terms that cancel (Σⱼ dSᵢⱼ = dlseᵢ), so a table gradient can land
    near 0 while each of its terms is O(1); fp32 rounding is relative to these term sums, not to the result.
    """
    H = kw["q"].shape[-2]
    scale = kw["q"].shape[-1] ** -0.5
    if kw.get("cu_seqlens_q") is None:
        spans = [(slice(None), slice(None), None)]
    else:
        cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
        spans = [
            (slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1]), b)
            for b in range(len(cu_q) - 1)
            if cu_q[b + 1] > cu_q[b]
        ]
    db = torch.zeros(H, NUM_GROUPS, dtype=torch.float64)  # [H, G]
    dg = torch.zeros(H, NUM_GROUPS, dtype=torch.float64)  # [H, G]
    for sq, sk, b in spans:
        batched = lambda t, s=sq, b=b: t if b is None else t[s][None]  # noqa: E731  [B, L, ...]
        q, k, v = batched(kw["q"].detach()), batched(kw["k"].detach(), sk), batched(kw["v"].detach(), sk)
        kg = None if kw["key_group"] is None else batched(kw["key_group"], sk)
        p, lse, onehot = reference._probabilities(q, k, kg, kw["bias"], kw["logit_scale"], scale, kw["causal"])
        rep = H // k.shape[2]
        q64 = q.double().transpose(1, 2)  # [B, H, Lq, D]
        k64 = k.double().transpose(1, 2).repeat_interleave(rep, 1)  # [B, H, Lk, D]
        v64 = v.double().transpose(1, 2).repeat_interleave(rep, 1)  # [B, H, Lk, D]
        w_out = batched(w["out"]).transpose(1, 2)  # [B, H, Lq, D]
        w_mass = w["mass"] if b is None else w["mass"][:, sq][None]  # [B, H, Lq, G]
        w_lse = w["lse"] if b is None else w["lse"][:, sq][None]  # [B, H, Lq]
        w_lse = torch.where(torch.isfinite(lse), w_lse, torch.zeros_like(w_lse))
        dp = w_out @ v64.transpose(-1, -2) + w_mass @ onehot[:, None].transpose(-1, -2)  # [B, H, Lq, Lk]
        d = (p * dp).sum(-1) - w_lse  # [B, H, Lq]
        ds = (p * (dp - d[..., None])).abs()  # [B, H, Lq, Lk]
        raw = scale * (q64 @ k64.transpose(-1, -2)).abs()  # [B, H, Lq, Lk]
        db += torch.einsum("bhj,bjg->hg", ds.sum(2), onehot)
        dg += torch.einsum("bhj,bjg->hg", (ds * raw).sum(2), onehot)
    return {"bias": db, "logit_scale": dg}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_grads_fp32_match_reference(case):
    kw = make_inputs(case, torch.float32, seed=3, requires_grad=True)
    w = _loss_weights(avar_ops.attention(**kw, return_mass=True), seed=4)
    got, ref = _our_grads(kw, w), _reference_grads(kw, w)
    term_scale = _table_term_scale(kw, w)
    for name in got:
        assert got[name].dtype == kw[name].dtype and got[name].shape == kw[name].shape
        if name in term_scale:
            terms = term_scale[name].sum(0) if got[name].dim() == 1 else term_scale[name]  # shared [G] tables
            diff = (got[name].double() - ref[name]).norm().item()
            size = max(ref[name].norm().item(), terms.norm().item())
            assert diff <= testing.FP32_OUT_REL * size, f"d{name}: error {diff:.2e} against term size {size:.2e}"
        else:
            err = testing.rel_err(got[name], ref[name])
            assert err <= testing.FP32_OUT_REL, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_grads_fp32_any_thread_count(threads):
    """One (sequence, kv head) and several threads: the backward splits the query blocks and sums partials."""
    case = Case("one_kv_head", batch=1, len_q=150, len_k=170, heads=7, kv_heads=1, head_dim=32, logit_scale="random")
    kw = make_inputs(case, torch.float32, seed=9, requires_grad=True)
    w = _loss_weights(avar_ops.attention(**kw, return_mass=True), seed=10)
    ref = _reference_grads(kw, w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _our_grads(kw, w)
    finally:
        torch.set_num_threads(before)
    for name in ("q", "k", "v"):
        err = testing.rel_err(got[name], ref[name])
        assert err <= testing.FP32_OUT_REL, f"d{name} with {threads} threads: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grads_bitwise_identical_for_any_thread_count(dtype):
    """The backward splits the query range by the problem's size, never by the thread count, and sums the split
    partials in a fixed order: every gradient is the same to the bit with 1, 2 or 3 threads. One (sequence,
    kv head) is the case that splits."""
    case = Case("one_kv_head", batch=1, len_q=300, heads=3, kv_heads=1, head_dim=32, logit_scale="random")
    kw = make_inputs(case, dtype, seed=21, requires_grad=True)
    w = _loss_weights(avar_ops.attention(**kw, return_mass=True), seed=22)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            names, leaves = _grad_inputs(kw)
            grads = torch.autograd.grad(_loss(avar_ops.attention(**kw, return_mass=True), w), leaves)
            runs.append(dict(zip(names, grads)))
    finally:
        torch.set_num_threads(before)
    for threads, run in zip((2, 3), runs[1:]):
        for name, g in run.items():
            assert torch.equal(g, runs[0][name]), f"d{name} differs between 1 and {threads} threads"


def _torch_lowp_grads(kw, w, causal):
    """Gradients of PyTorch's own bf16 attention (eager maps) for the same loss (varlen: per sequence)."""
    names, leaves = _grad_inputs(kw)
    args = lambda q, k, v, kg: (q, k, v, kg, kw["bias"], kw["logit_scale"], None, causal)  # noqa: E731
    if kw.get("cu_seqlens_q") is None:
        out, mass = testing.torch_lowp_attention(*args(kw["q"], kw["k"], kw["v"], kw["key_group"]))
        loss = (out.double() * w["out"]).sum() + (mass.double() * w["mass"]).sum()
    else:
        cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
        loss = 0.0
        for b in range(len(cu_q) - 1):
            q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
            if q1 == q0:
                continue
            kg = kw["key_group"][k0:k1][None] if kw["key_group"] is not None else None
            out, mass = testing.torch_lowp_attention(
                *args(kw["q"][None, q0:q1], kw["k"][None, k0:k1], kw["v"][None, k0:k1], kg)
            )
            loss = loss + (out[0].double() * w["out"][q0:q1]).sum() + (mass[0].double() * w["mass"][:, q0:q1]).sum()
    if not isinstance(loss, torch.Tensor):  # every sequence empty: nothing depends on the inputs
        return {n: None for n in names}
    return dict(zip(names, torch.autograd.grad(loss, leaves, allow_unused=True)))


def _cpu_flags() -> set:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The long bf16 cases build the eager bf16 yardstick and the float64 reference, both of which materialise
# [H, L, L] maps with autograd: a few minutes where PyTorch's bf16 kernels run natively (avx512_bf16), far
# longer where bf16 is emulated through fp32. They run on such CPUs, or anywhere with AVAR_TEST_LONG_BF16=1.
LONG_BF16_LEN = 130
LONG_BF16_OPT_IN = "AVAR_TEST_LONG_BF16"


def _long_bf16_skip_reason():
    if os.environ.get(LONG_BF16_OPT_IN) == "1":
        return None
    if "avx512_bf16" in _cpu_flags():
        return None
    return (
        f"bf16 case with len_q > {LONG_BF16_LEN}: this CPU has no avx512_bf16 in /proc/cpuinfo (bf16 maps are "
        f"emulated through fp32 and the [H, L, L] yardstick takes far longer) and {LONG_BF16_OPT_IN}=1 is not set"
    )


BF16_CASES = [
    c
    if c.len_q <= LONG_BF16_LEN or _long_bf16_skip_reason() is None
    else pytest.param(c, marks=pytest.mark.skip(reason=_long_bf16_skip_reason()))
    for c in CASES
]


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_grads_bf16_within_three_times_torch_error(case):
    _check_bf16_grads(case)


# bf16 has two CPU backward paths, as the forward: bf16 GEMMs through oneDNN where they run, else fp32 GEMMs
# (oneDNN switched off selects the second on any machine). AVAR_EMULATE_BF16_GEMM=1 runs the bf16 GEMM path
# with a loop GEMM of the same layout, so its packing and rounding are tested on CPUs without oneDNN's bf16
# kernels too. Odd head dim and odd stacked-row counts (GQA 3, odd lengths) exercise every zero pad of the
# pair layout; varlen with an empty sequence and keys past the queries exercises the per-sequence bounds.
@pytest.mark.parametrize("path", ["onednn", "no_onednn", "emulated"])
@pytest.mark.parametrize(
    "case",
    [
        Case("odd_d33_gqa3", len_q=70, heads=6, kv_heads=2, head_dim=33, logit_scale="random"),
        Case("varlen_gqa3", varlen=(5, 0, 41), len_k=3, heads=3, kv_heads=1, head_dim=16, logit_scale="random"),
    ],
    ids=lambda c: c.name,
)
def test_grads_bf16_both_gemm_paths(case, path, monkeypatch):
    if path == "emulated":
        monkeypatch.setenv("AVAR_EMULATE_BF16_GEMM", "1")
    was_enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = path != "no_onednn"
    try:
        _check_bf16_grads(case)
    finally:
        torch.backends.mkldnn.enabled = was_enabled


def _check_bf16_grads(case):
    kw = make_inputs(case, torch.bfloat16, seed=5, requires_grad=True)
    # The yardstick returns no lse, so the bf16 loss weighs out and mass only.
    w = _loss_weights(avar_ops.attention(**kw, return_mass=True), seed=6, with_lse=False)
    got, ref = _our_grads(kw, w), _reference_grads(kw, w)
    torch_grads = _torch_lowp_grads(kw, w, case.causal)
    for name in got:
        assert got[name].dtype == kw[name].dtype
        t = torch_grads[name]
        torch_err = testing.rel_err(t if t is not None else torch.zeros_like(ref[name]), ref[name])
        err = testing.rel_err(got[name], ref[name])
        bound = testing.lowp_bound(torch_err, torch.bfloat16, testing.LOWP_GRAD_FACTOR)
        assert err <= bound, f"d{name}: relative error {err:.2e}, PyTorch bf16 {torch_err:.2e}"


GRADCHECK_CASES = [
    Case("gc_gqa_causal", batch=2, len_q=7, heads=4, kv_heads=2, head_dim=8, logit_scale="random"),
    Case(
        "gc_noncausal_lq_lt_lk",
        batch=1,
        len_q=5,
        len_k=9,
        heads=2,
        kv_heads=1,
        head_dim=8,
        causal=False,
        logit_scale="shared",
        bias="shared",
    ),
    Case("gc_dead_rows", batch=1, len_q=12, heads=2, kv_heads=1, head_dim=8, groups="dead_rows", logit_scale="random"),
    Case("gc_varlen", varlen=(3, 0, 6), len_k=2, heads=2, kv_heads=2, head_dim=8, logit_scale="random"),
]


def _gradcheck_fn(kw, names, outputs):
    """fn(*leaves) -> the chosen outputs; bias and logit_scale leaves are float64 and cast to the op's float32."""
    leaves = [kw[n].detach().to(torch.float64).requires_grad_(True) for n in names]

    def fn(*xs):
        args = {n: (x.float() if n in ("bias", "logit_scale") else x) for n, x in zip(names, xs)}
        res = avar_ops.attention(**{**kw, **args}, return_mass=True)
        parts = {"out": res.out, "lse": _finite_lse(res.lse), "mass": res.mass}
        return tuple(parts[o] for o in outputs)

    return fn, leaves


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.name)
def test_gradcheck_qkv_through_out_fp64(case):
    """out is float64 here, so gradcheck's default eps and tolerances apply."""
    kw = make_inputs(case, torch.float64, seed=7)
    fn, leaves = _gradcheck_fn(kw, ("q", "k", "v"), ("out",))
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.name)
def test_gradcheck_all_inputs_through_out_lse_mass_fp64(case):
    """lse, mass and the bias / logit_scale tables are float32: larger eps, atol argued in avar_ops.core.testing."""
    kw = make_inputs(case, torch.float64, seed=8)
    names, _ = _grad_inputs(kw)
    assert "bias" in names and "logit_scale" in names
    fn, leaves = _gradcheck_fn(kw, names, ("out", "lse", "mass"))
    assert torch.autograd.gradcheck(
        fn, leaves, eps=testing.GRADCHECK_F32_OUTPUT_EPS, atol=testing.GRADCHECK_F32_OUTPUT_ATOL
    )


def test_dead_rows_get_zero_gradient():
    kw = make_inputs(
        Case("dead", batch=1, len_q=20, heads=2, kv_heads=1, head_dim=16, groups="dead_rows"),
        torch.float32,
        requires_grad=True,
    )
    got = avar_ops.attention(**kw, return_mass=True)
    dead = torch.isneginf(got.lse)  # [B, H, Lq]
    assert dead.any(), "the case must have rows that see no key"
    (dq,) = torch.autograd.grad(got.out.sum() + got.mass.sum() + _finite_lse(got.lse).sum(), [kw["q"]])
    dq_dead = dq.transpose(1, 2)[dead]  # [n_dead, D]
    assert torch.equal(dq_dead, torch.zeros_like(dq_dead))


OPCHECK_CASES = [
    Case("op_gqa", batch=2, len_q=9, heads=4, kv_heads=2, head_dim=16, logit_scale="random"),
    Case("op_varlen", varlen=(4, 7), heads=2, kv_heads=1, head_dim=16, causal=False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck_forward_with_autograd(case):
    kw = make_inputs(case, torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.avar.attention_fwd, fwd_op_args(kw))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck_backward(case):
    kw = make_inputs(case, torch.float32)
    out, lse, mass = torch.ops.avar.attention_fwd(*fwd_op_args(kw))
    dout, dmass, dlse = torch.randn_like(out), torch.randn_like(mass), torch.randn_like(lse)
    fa = fwd_op_args(kw)
    args = (
        dout,
        dmass,
        dlse,
        kw["q"],
        kw["k"],
        kw["v"],
        out,
        lse,
        mass,
        kw["key_group"],
        kw["bias"],
        kw["logit_scale"],
        *fa[6:12],
        kw["bias"] is not None,
        kw["logit_scale"] is not None,
    )
    torch.library.opcheck(torch.ops.avar.attention_bwd, args)


def test_compile_forward_and_backward():
    kw = make_inputs(
        Case("compiled", batch=1, len_q=24, heads=4, kv_heads=2, head_dim=16), torch.float32, requires_grad=True
    )

    def agto_like(q, k, v, bias):
        res = avar_ops.attention(q, k, v, kw["key_group"], bias, return_mass=True)
        return res.out.square().mean() - torch.log(res.mass[..., 1].mean() + 1e-6)

    leaves = [kw["q"], kw["k"], kw["v"], kw["bias"]]
    compiled = torch.compile(agto_like, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(agto_like(*leaves), leaves)
    for g, e in zip(got, want):
        assert testing.rel_err(g, e) <= testing.FP32_OUT_REL


def test_adam_on_bias_raises_image_mass():
    """−log(image mass) through the kernel, minimised by Adam on the bias, must move attention to the image."""
    case = Case("opt", batch=1, len_q=64, heads=4, kv_heads=1, head_dim=32, bias="zero", groups="random")
    kw = make_inputs(case, torch.float32)
    kg = kw["key_group"]
    kg[0, :4] = 2  # a system prompt
    kg[0, 4:36] = 1  # image tokens
    bias = torch.zeros(case.heads, NUM_GROUPS, requires_grad=True)
    opt = torch.optim.Adam([bias], lr=0.2)

    def image_mass():
        res = avar_ops.attention(kw["q"], kw["k"], kw["v"], kg, bias, return_mass=True)
        return res.mass[:, :, 36:, 1].mean()  # queries after the image

    start = image_mass().item()
    for _ in range(8):
        opt.zero_grad()
        loss = -torch.log(image_mass() + 1e-6)
        loss.backward()
        opt.step()
    end = image_mass().item()
    assert end > start + 0.1, f"image mass went from {start:.3f} to {end:.3f}"
    assert (bias.detach()[:, 1] > 0).all(), "the image bias must have grown in every head"


def _bwd_call(kw, out, lse, mass, dmass=None, dlse=None):
    fa = fwd_op_args(kw)
    return torch.ops.avar.attention_bwd(
        torch.ones_like(out),
        dmass,
        dlse,
        kw["q"],
        kw["k"],
        kw["v"],
        out,
        lse,
        mass,
        kw["key_group"],
        kw["bias"],
        kw["logit_scale"],
        *fa[6:12],
        False,
        False,
    )


def test_bwd_rejects_bad_dmass_and_dlse():
    kw = make_inputs(Case("bad", batch=2, len_q=8, heads=2, kv_heads=1, head_dim=16), torch.float32)
    out, lse, mass = torch.ops.avar.attention_fwd(*fwd_op_args(kw))
    with pytest.raises(ValueError, match=r"dmass must have shape \[2, 2, 8, 4\].*got \[2, 2, 8, 3\]"):
        _bwd_call(kw, out, lse, mass, dmass=torch.zeros(2, 2, 8, 3))
    with pytest.raises(ValueError, match="dmass was given without mass"):
        _bwd_call(kw, out, lse, None, dmass=torch.zeros_like(mass))
    with pytest.raises(TypeError, match="dmass must be Float, got Double"):
        _bwd_call(kw, out, lse, mass, dmass=torch.zeros_like(mass, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dlse must have shape \[2, 2, 8\]"):
        _bwd_call(kw, out, lse, mass, dlse=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"out must have shape"):
        _bwd_call(kw, out[:, :4], lse, mass)
