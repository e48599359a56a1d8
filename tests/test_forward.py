"""The CPU forward against the float64 reference over the shared grid, plus opcheck and torch.compile."""

import pytest
import torch
from cases import CASES, SMALL_CASES, Case, fwd_op_args, make_inputs

import avar_ops
from avar_ops.core import NUM_GROUPS, testing


def _finite_lse_matches(lse, ref_lse):
    """Dead rows (no visible key) must be exactly −inf in both; the others close in absolute terms."""
    ref_dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ref_dead), "rows with no visible key must give lse = -inf"
    assert not torch.isnan(lse).any()
    alive = ~ref_dead
    return testing.max_abs_err(lse[alive], ref_lse[alive])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_fp32_matches_reference(case):
    kw = make_inputs(case, torch.float32)
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    assert got.out.dtype == torch.float32 and got.out.shape == kw["q"].shape
    assert testing.rel_err(got.out, ref.out) <= testing.FP32_OUT_REL
    assert testing.max_abs_err(got.mass, ref.mass) <= testing.FP32_MASS_ABS
    assert _finite_lse_matches(got.lse, ref.lse) <= testing.FP32_LSE_ABS


@pytest.mark.parametrize("case", [c for c in CASES if c.len_q <= 130], ids=lambda c: c.name)
def test_forward_bf16_within_twice_torch_error(case):
    kw = make_inputs(case, torch.bfloat16)
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    assert got.out.dtype == torch.bfloat16
    # PyTorch's own bf16 attention on the same inputs is the yardstick (varlen: per sequence, batched view).
    if case.varlen is None:
        t_out, t_mass = testing.torch_lowp_attention(
            kw["q"], kw["k"], kw["v"], kw["key_group"], kw["bias"], kw["logit_scale"], None, case.causal
        )
        t_out_err, t_mass_err = testing.rel_err(t_out, ref.out), testing.max_abs_err(t_mass, ref.mass)
    else:
        t_out_err, t_mass_err = _varlen_torch_errors(kw, ref, case.causal)
    assert testing.rel_err(got.out, ref.out) <= testing.lowp_bound(t_out_err, torch.bfloat16, testing.LOWP_FWD_FACTOR)
    assert testing.max_abs_err(got.mass, ref.mass) <= testing.lowp_bound(
        t_mass_err, torch.bfloat16, testing.LOWP_FWD_FACTOR
    )
    assert _finite_lse_matches(got.lse, ref.lse) <= testing.LOWP_LSE_ABS


# bf16 has two CPU paths: bf16 GEMMs through oneDNN where it runs (P rounded to bf16 before P·V), else fp32
# GEMMs. Switching oneDNN off selects the second, so both meet the bf16 rule on any machine. The odd head dim
# exercises the zero pad of the bf16 GEMM's even reduction length; L = 70 gives diagonal tiles with odd widths.
# AVAR_EMULATE_BF16_GEMM=1 runs the bf16 GEMM path with a loop GEMM of the same layout (tests it on any CPU).
@pytest.mark.parametrize("path", ["onednn", "no_onednn", "emulated"])
@pytest.mark.parametrize(
    "case",
    [
        Case("odd_d33_gqa3", len_q=70, heads=6, kv_heads=2, head_dim=33, logit_scale="random"),
        Case("L129_gqa7_d128", batch=1, len_q=129, heads=7, kv_heads=1, head_dim=128),
    ],
    ids=lambda c: c.name,
)
def test_forward_bf16_both_gemm_paths(case, path, monkeypatch):
    kw = make_inputs(case, torch.bfloat16, seed=3)
    if path == "emulated":
        monkeypatch.setenv("AVAR_EMULATE_BF16_GEMM", "1")
    was_enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = path != "no_onednn"
    try:
        got = avar_ops.attention(**kw, return_mass=True)
    finally:
        torch.backends.mkldnn.enabled = was_enabled
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    t_out, t_mass = testing.torch_lowp_attention(
        kw["q"], kw["k"], kw["v"], kw["key_group"], kw["bias"], kw["logit_scale"], None, case.causal
    )
    assert testing.rel_err(got.out, ref.out) <= testing.lowp_bound(
        testing.rel_err(t_out, ref.out), torch.bfloat16, testing.LOWP_FWD_FACTOR
    )
    assert testing.max_abs_err(got.mass, ref.mass) <= testing.lowp_bound(
        testing.max_abs_err(t_mass, ref.mass), torch.bfloat16, testing.LOWP_FWD_FACTOR
    )
    assert _finite_lse_matches(got.lse, ref.lse) <= testing.LOWP_LSE_ABS


def _varlen_torch_errors(kw, ref, causal):
    cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
    outs, masses, ref_outs, ref_masses = [], [], [], []
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0:
            continue
        kg = kw["key_group"][k0:k1][None] if kw["key_group"] is not None else None
        o, m = testing.torch_lowp_attention(
            kw["q"][None, q0:q1],
            kw["k"][None, k0:k1],
            kw["v"][None, k0:k1],
            kg,
            kw["bias"],
            kw["logit_scale"],
            None,
            causal,
        )
        outs.append(o[0])
        masses.append(m[0])
        ref_outs.append(ref.out[q0:q1])
        ref_masses.append(ref.mass[:, q0:q1])
    if not outs:  # every sequence empty: PyTorch has nothing to get wrong
        return 0.0, 0.0
    return (
        testing.rel_err(torch.cat(outs), torch.cat(ref_outs)),
        testing.max_abs_err(torch.cat(masses, 1), torch.cat(ref_masses, 1)),
    )


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_forward_fp64_is_exact_to_rounding(case):
    kw = make_inputs(case, torch.float64)
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    assert testing.rel_err(got.out, ref.out) <= testing.FP64_OUT_REL
    assert testing.max_abs_err(got.mass, ref.mass) <= testing.FP32_OUTPUT_ROUNDING


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_masses_sum_to_one_minus_masked(case):
    """Masked keys get no probability: a query's four masses sum to 1 if it sees any key, else to 0."""
    kw = make_inputs(case, torch.float32)
    got = avar_ops.attention(**kw, return_mass=True)
    total = got.mass.sum(-1).double()  # [B, H, Lq] | [H, Tq]
    alive = torch.isfinite(got.lse)
    assert torch.allclose(total[alive], torch.ones_like(total[alive]), atol=NUM_GROUPS * testing.FP32_MASS_ABS)
    assert torch.equal(total[~alive], torch.zeros_like(total[~alive]))
    assert (got.mass >= 0).all()


def test_dead_rows_are_zero_not_nan():
    case = Case("dead", batch=2, len_q=20, heads=4, kv_heads=2, groups="dead_rows")
    kw = make_inputs(case)
    got = avar_ops.attention(**kw, return_mass=True)
    dead = torch.isneginf(got.lse)  # [B, H, Lq]
    assert dead.any(), "the case must contain rows that see no key"
    out_bhl = got.out.transpose(1, 2)  # [B, H, Lq, D]
    assert torch.equal(out_bhl[dead], torch.zeros_like(out_bhl[dead]))
    assert torch.equal(got.mass[dead], torch.zeros_like(got.mass[dead]))


def test_return_mass_false_gives_none_and_same_out():
    kw = make_inputs(CASES[1])
    with_mass = avar_ops.attention(**kw, return_mass=True)
    without = avar_ops.attention(**kw)
    assert without.mass is None
    assert torch.equal(with_mass.out, without.out) and torch.equal(with_mass.lse, without.lse)


def test_bias_moves_mass_toward_boosted_group():
    kw = make_inputs(Case("boost", len_q=64, heads=4, kv_heads=2, bias="none"))
    base = avar_ops.attention(**kw, return_mass=True).mass
    boost = torch.tensor([0.0, 2.0, -2.0, 0.0])
    moved = avar_ops.attention(**{**kw, "bias": boost}, return_mass=True).mass
    alive = base.sum(-1) > 0
    assert (moved[..., 1][alive] >= base[..., 1][alive] - 1e-6).all()
    assert moved[..., 1][alive].mean() > base[..., 1][alive].mean() + 0.1


def test_default_scale_is_inverse_sqrt_head_dim():
    kw = make_inputs(CASES[1])
    a = avar_ops.attention(**kw).out
    b = avar_ops.attention(**kw, scale=kw["q"].shape[-1] ** -0.5).out
    assert torch.equal(a, b)


def test_opcheck_forward():
    for case in SMALL_CASES[:4]:
        kw = make_inputs(case)
        args = fwd_op_args(kw)
        torch.library.opcheck(
            torch.ops.avar.attention_fwd.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


def test_torch_compile_fullgraph():
    kw = make_inputs(CASES[1])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v, key_group, bias):
        res = avar_ops.attention(q, k, v, key_group, bias, return_mass=True)
        return res.out * 2, res.mass.sum(-1)

    out, total = fn(kw["q"], kw["k"], kw["v"], kw["key_group"], kw["bias"])
    ref = avar_ops.attention(kw["q"], kw["k"], kw["v"], kw["key_group"], kw["bias"], return_mass=True)
    assert torch.equal(out, ref.out * 2)
    assert torch.equal(total, ref.mass.sum(-1))
