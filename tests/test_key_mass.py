"""attention_key_mass (attention received per key, Σᵢ wᵢ·Pᵢⱼ) against the float64 reference's materialised P."""

import pytest
import torch
from cases import CASES, Case, key_mass_of, key_mass_op_args, key_mass_reference_of, make_inputs
from test_cpu_decode import DECODE_CASES, SEEDS

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


# Against a cache (at most 4 queries per sequence) the CPU kernel scores the keys where they lie with the decode's dot
# products instead of a transposed copy and a GEMM: the decode grid (GQA groups of 1-7 heads, caches off the 4-key
# and 32-key steps, head dims off the vector width, ragged varlen batches, dead rows) through that path.
@pytest.mark.parametrize("path", ["fp32", "bf16", "bf16_widened"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_key_mass_against_a_cache_matches_reference(case, seed, path, monkeypatch):
    dtype = torch.float32 if path == "fp32" else torch.bfloat16
    if path == "bf16_widened":  # bf16 keys widened to fp32 instead of the AVX512-BF16 dot product
        monkeypatch.setenv("AVAR_CPU_BF16_DOT", "0")
    kw = make_inputs(case, dtype, seed=seed)
    lse = avar_ops.attention(**kw).lse
    w = _weights(kw, per_head=seed % 2 == 0, seed=seed + 100)
    err = testing.rel_err(key_mass_of(kw, lse, w), key_mass_reference_of(kw, w))
    assert err <= testing.FP32_OUT_REL, f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_key_mass_against_a_cache_ignores_masked_garbage(dtype):
    """Masked cache rows (group −1) holding NaN and huge values get mass 0 and leave the other keys' masses as the
    reference computes them with those rows zeroed."""
    gen = torch.Generator().manual_seed(3)
    case = Case("pad", batch=3, len_q=1, len_k=300, heads=14, kv_heads=2, head_dim=128, logit_scale="random")
    kw = make_inputs(case, dtype, seed=4)
    kg = kw["key_group"].clone()  # [B, Lk]
    clean_k = kw["k"].detach().clone()
    with torch.no_grad():
        for b, n in enumerate([0, 7, 150]):
            kg[b, :n] = -1
            clean_k[b, :n] = 0
            junk = torch.randn(n, 2, 128, generator=gen) * 3e38
            junk[::2] = float("nan")
            kw["k"][b, :n] = junk.to(dtype)
    kw["key_group"] = kg
    lse = avar_ops.attention(**kw).lse
    w = _weights(kw, per_head=True, seed=5)
    got = key_mass_of(kw, lse, w)
    assert torch.isfinite(got).all()
    assert torch.equal(got[2, :, :150], torch.zeros_like(got[2, :, :150]))
    err = testing.rel_err(got, key_mass_reference_of({**kw, "k": clean_k}, w))
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
