"""attention_key_mass (attention received per key, Σᵢ wᵢ·Pᵢⱼ) against the float64 reference's materialised P."""

import pytest
import torch
from cases import CASES, Case, key_mass_of, key_mass_op_args, key_mass_reference_of, make_inputs

import avar_ops
from avar_ops.core import testing


def _weights(kw, per_head, seed):
    """Random non-negative query weights [B, H, Lq] / [B, Lq] (varlen [H, Tq] / [Tq]), some exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    q = kw["q"]
    varlen = kw.get("cu_seqlens_q") is not None
    if varlen:
        shape = (q.shape[1], q.shape[0]) if per_head else (q.shape[0],)
    else:
        shape = (q.shape[0], q.shape[2], q.shape[1]) if per_head else (q.shape[0], q.shape[1])
    w = torch.rand(shape, generator=gen)
    return w * (torch.rand(shape, generator=gen) > 0.3)


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_key_mass_matches_reference(case, dtype, per_head):
    kw = make_inputs(case, dtype, seed=11)
    lse = avar_ops.attention(**kw).lse
    w = _weights(kw, per_head, seed=12)
    got = key_mass_of(kw, lse, w)
    ref = key_mass_reference_of(kw, w)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # bf16 inputs are read exactly and everything after is fp32 (no bf16 output rounding), so both dtypes
    # are held to the fp32 bound; the reference reads the same bf16 values.
    err = testing.rel_err(got, ref)
    assert err <= testing.FP32_OUT_REL, f"relative error {err:.2e}"


def test_key_mass_of_all_queries_sums_to_live_rows():
    """With w = 1 on every query, the key masses of a head add up to the number of queries that see a key."""
    kw = make_inputs(
        Case("sum", batch=2, len_q=40, heads=4, kv_heads=2, head_dim=32, groups="dead_rows"), torch.float32
    )
    lse = avar_ops.attention(**kw).lse  # [B, H, Lq]
    w = torch.ones(2, 40)
    got = key_mass_of(kw, lse, w).double().sum(-1)  # [B, H]
    live = torch.isfinite(lse).sum(-1).double()  # [B, H]
    assert torch.allclose(got, live, rtol=testing.FP32_OUT_REL, atol=0)


def test_key_mass_rejects_bad_query_weight():
    kw = make_inputs(Case("bad", batch=2, len_q=8, heads=2, kv_heads=1, head_dim=16), torch.float32)
    lse = avar_ops.attention(**kw).lse
    with pytest.raises(
        ValueError,
        match=r"query_weight must be \[B, H, Lq\] = \[2, 2, 8\] or \[B, Lq\] = \[2, 8\], "
        r"got shape \[2, 3, 8\]",
    ):
        key_mass_of(kw, lse, torch.ones(2, 3, 8))
    with pytest.raises(TypeError, match="query_weight must be float32, got Double"):
        key_mass_of(kw, lse, torch.ones(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"lse must have shape \[2, 2, 8\]"):
        key_mass_of(kw, lse[:, :1], torch.ones(2, 8))


def test_key_mass_rejects_bad_varlen_query_weight():
    kw = make_inputs(Case("bad_varlen", varlen=(3, 5), heads=2, kv_heads=1, head_dim=16), torch.float32)
    lse = avar_ops.attention(**kw).lse  # [H, Tq]
    tq = kw["q"].shape[0]
    with pytest.raises(ValueError, match=rf"query_weight must be \[H, Tq\] = \[2, {tq}\] or \[Tq\] = \[{tq}\]"):
        key_mass_of(kw, lse, torch.ones(2, tq + 1))


@pytest.mark.parametrize(
    "case",
    [
        Case("op_gqa", batch=2, len_q=9, heads=4, kv_heads=2, head_dim=16, logit_scale="random"),
        Case("op_varlen", varlen=(4, 7), heads=2, kv_heads=1, head_dim=16, causal=False),
    ],
    ids=lambda c: c.name,
)
def test_opcheck_key_mass(case):
    kw = make_inputs(case, torch.float32)
    lse = avar_ops.attention(**kw).lse
    w = _weights(kw, per_head=True, seed=13)
    torch.library.opcheck(torch.ops.avar.attention_key_mass, key_mass_op_args(kw, lse, w))
