"""The CPU decode path (csrc/attention/cpu/decode.cpp: at most 4 queries per sequence) against the float64 reference.

Every output starts as NaN (tests/conftest.py poisons them), so a row the kernel forgets to write fails. The grid
covers what the kernel does differently from the tiled forward: GQA groups of 1, 2, 3 and 7 heads stacked as rows,
caches that are not a multiple of its 32-key chunk, key ranges split over threads and merged (one long cache with
one or two kv heads is split whatever the thread count), several queries per sequence under the causal mask, ragged
varlen batches mixing split and unsplit sequences, bias and logit-scale tables, rows with no visible key, and
masked keys holding garbage.
"""

import pytest
import torch
from cases import Case, make_inputs
from test_forward import _finite_lse_matches, _varlen_torch_errors

import avar_ops
from avar_ops.core import NUM_GROUPS, testing

SEEDS = (0, 1, 2)

DECODE_CASES = [
    Case("gqa1_L37", batch=3, len_q=1, len_k=37, heads=4, kv_heads=4, head_dim=64),
    Case("gqa2_Lq2_L1000", batch=2, len_q=2, len_k=1000, heads=4, kv_heads=2, head_dim=80, logit_scale="random"),
    # One sequence, two kv heads, 2100 keys: split into ranges and merged.
    Case("gqa7_L2100_split", batch=1, len_q=1, len_k=2100, heads=14, kv_heads=2, head_dim=128, logit_scale="random"),
    Case("gqa7_Lq4_L301", batch=2, len_q=4, len_k=301, heads=7, kv_heads=1, head_dim=128, logit_scale="shared"),
    Case("gqa3_d33_Lq3", batch=2, len_q=3, len_k=65, heads=6, kv_heads=2, head_dim=33, bias="shared"),
    Case("noncausal_Lq4", batch=2, len_q=4, len_k=90, heads=4, kv_heads=2, head_dim=64, causal=False),
    Case("groups_none", batch=2, len_q=1, len_k=129, heads=4, kv_heads=1, groups="none", bias="none"),
    # The first 7 keys masked: of 4 queries on 9 keys, the first two see no live key, the last two do.
    Case("dead_rows", batch=2, len_q=4, len_k=9, heads=4, kv_heads=2, groups="dead_rows"),
    Case("dead_rows_L40", batch=3, len_q=2, len_k=40, heads=14, kv_heads=2, head_dim=128, groups="dead_rows"),
    # Ragged: 1, 0, 4, 2 queries on 2001, 2000, 2004, 2002 keys, and padded rows past the last sequence.
    Case("varlen_mixed", varlen=(1, 0, 4, 2), len_k=2000, heads=7, kv_heads=1, head_dim=128, logit_scale="random"),
    Case("varlen_decode", varlen=(1, 1, 3, 1), len_k=50, heads=4, kv_heads=4, head_dim=80),
]


def _check_fp32(kw, got, ref):
    assert testing.rel_err(got.out, ref.out) <= testing.FP32_OUT_REL
    assert testing.max_abs_err(got.mass, ref.mass) <= testing.FP32_MASS_ABS
    assert _finite_lse_matches(got.lse, ref.lse) <= testing.FP32_LSE_ABS


def _check_bf16(kw, got, ref, causal):
    if "cu_seqlens_q" in kw:
        t_out_err, t_mass_err = _varlen_torch_errors(kw, ref, causal)
    else:
        t_out, t_mass = testing.torch_lowp_attention(
            kw["q"], kw["k"], kw["v"], kw["key_group"], kw["bias"], kw["logit_scale"], None, causal
        )
        t_out_err, t_mass_err = testing.rel_err(t_out, ref.out), testing.max_abs_err(t_mass, ref.mass)
    bf16 = torch.bfloat16
    assert testing.rel_err(got.out, ref.out) <= testing.lowp_bound(t_out_err, bf16, testing.LOWP_FWD_FACTOR)
    assert testing.max_abs_err(got.mass, ref.mass) <= testing.lowp_bound(t_mass_err, bf16, testing.LOWP_FWD_FACTOR)
    assert _finite_lse_matches(got.lse, ref.lse) <= testing.LOWP_LSE_ABS


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_decode_fp32_matches_reference(case, seed):
    kw = make_inputs(case, torch.float32, seed=seed)
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    _check_fp32(kw, got, ref)


# bf16 keys go through the AVX512-BF16 dot product where the CPU has it, and are widened to fp32 otherwise;
# AVAR_CPU_BF16_DOT=0 forces the second path, so both are tested on a CPU that has the instruction (on one that
# lacks it, or on an AVX2 / scalar build, both settings run the widened path).
@pytest.mark.parametrize("bf16_dot", ["auto", "off"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_decode_bf16_within_twice_torch_error(case, seed, bf16_dot, monkeypatch):
    if bf16_dot == "off":
        monkeypatch.setenv("AVAR_CPU_BF16_DOT", "0")
    kw = make_inputs(case, torch.bfloat16, seed=seed)
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    assert got.out.dtype == torch.bfloat16
    _check_bf16(kw, got, ref, case.causal)


# The bf16 switches of the tiled forward (oneDNN's bf16 GEMM on or off, or emulated) must not change what a decode
# step computes: every path a CPU may take meets the same bound.
@pytest.mark.parametrize("path", ["onednn", "no_onednn", "emulated"])
def test_decode_bf16_every_gemm_setting(path, monkeypatch):
    case = DECODE_CASES[2]
    kw = make_inputs(case, torch.bfloat16, seed=5)
    if path == "emulated":
        monkeypatch.setenv("AVAR_EMULATE_BF16_GEMM", "1")
    was_enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = path != "no_onednn"
    try:
        got = avar_ops.attention(**kw, return_mass=True)
    finally:
        torch.backends.mkldnn.enabled = was_enabled
    _check_bf16(kw, got, avar_ops.attention_reference(**kw, return_mass=True), case.causal)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_same_answer_for_any_thread_count(threads):
    """The number of key ranges grows with the thread count (B·H_kv = 2 here); each split must merge to the answer."""
    case = Case("split", batch=1, len_q=2, len_k=4000, heads=8, kv_heads=2, head_dim=64, logit_scale="random")
    kw = make_inputs(case, torch.float32, seed=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = avar_ops.attention(**kw, return_mass=True)
    finally:
        torch.set_num_threads(before)
    _check_fp32(kw, got, avar_ops.attention_reference(**kw, return_mass=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_decode_varlen_split_and_unsplit_sequences(dtype, seed):
    """One long sequence (split into key ranges) next to short ones (one range each) in one varlen call."""
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k = [1, 2, 1, 3], [3000, 7, 40, 3]
    H, Hkv, D = 7, 1, 128
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    kw = dict(
        q=torch.randn(int(cu_q[-1]), H, D, generator=gen).to(dtype),
        k=torch.randn(int(cu_k[-1]), Hkv, D, generator=gen).to(dtype),
        v=torch.randn(int(cu_k[-1]), Hkv, D, generator=gen).to(dtype),
        key_group=torch.randint(-1, NUM_GROUPS, (int(cu_k[-1]),), generator=gen).to(torch.int8),
        bias=1.5 * torch.randn(H, NUM_GROUPS, generator=gen),
        logit_scale=1 + 0.4 * torch.randn(H, NUM_GROUPS, generator=gen),
        causal=True,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
    )
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    if dtype == torch.float32:
        _check_fp32(kw, got, ref)
    else:
        _check_bf16(kw, got, ref, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_decode_left_padding_garbage_never_enters(dtype, seed):
    """A left-padded batch (B > 1, padding of different lengths, group −1) whose padded K and V rows hold NaN and
    huge values: every row equals the reference computed with those rows zeroed, masses included."""
    gen = torch.Generator().manual_seed(seed)
    B, Lk, H, Hkv, D = 4, 700, 14, 2, 128
    case = Case("pad", batch=B, len_q=1, len_k=Lk, heads=H, kv_heads=Hkv, head_dim=D, logit_scale="random")
    kw = make_inputs(case, dtype, seed=seed)
    pad = [0, 5, 33, 650]  # keys of padding per sequence
    kg = kw["key_group"].clone()  # [B, Lk]
    clean_k, clean_v = kw["k"].detach().clone(), kw["v"].detach().clone()
    with torch.no_grad():
        for b, n in enumerate(pad):
            kg[b, :n] = -1
            clean_k[b, :n] = 0
            clean_v[b, :n] = 0
            junk = torch.randn(n, Hkv, D, generator=gen) * 3e38
            junk[::3] = float("nan")
            kw["k"][b, :n] = junk.to(dtype)
            kw["v"][b, :n] = junk.flip(0).to(dtype)
    kw["key_group"] = kg
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**{**kw, "k": clean_k, "v": clean_v}, return_mass=True)
    assert torch.isfinite(got.out).all() and torch.isfinite(got.mass).all()
    if dtype == torch.float32:
        _check_fp32(kw, got, ref)
    else:
        _check_bf16({**kw, "k": clean_k, "v": clean_v}, got, ref, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_dead_and_nan_rows(dtype):
    """A sequence whose keys are all masked is dead (out 0, lse −inf, mass 0) whatever its q holds; a live row with a
    NaN in q, or whose scores overflow, is NaN throughout and never passes for a dead row; the other rows stay
    finite."""
    gen = torch.Generator().manual_seed(0)
    B, Lk, H, Hkv, D = 3, 300, 8, 2, 64
    q = torch.randn(B, 1, H, D, generator=gen)
    k = torch.randn(B, Lk, Hkv, D, generator=gen)
    v = torch.randn(B, Lk, Hkv, D, generator=gen)
    kg = torch.randint(0, NUM_GROUPS, (B, Lk), generator=gen).to(torch.int8)
    kg[0] = -1  # sequence 0: every key masked
    q[0, 0, :] = float("nan")  # dead rows stay dead even with NaN queries
    q[1, 0, 5, 3] = float("nan")  # head 5 of sequence 1: NaN scores
    q[2, 0, 1] = 1e30
    k[2, 200, 0] = 1e30  # head 1 of sequence 2 (kv head 0) sees a score that overflows
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    got = avar_ops.attention(q, k, v, kg, return_mass=True)
    assert torch.equal(got.out[0], torch.zeros_like(got.out[0]))
    assert torch.isneginf(got.lse[0]).all() and torch.equal(got.mass[0], torch.zeros_like(got.mass[0]))
    for b, h in ((1, 5), (2, 1)):
        assert torch.isnan(got.out[b, 0, h]).all() and torch.isnan(got.mass[b, h]).all()
        assert torch.isnan(got.lse[b, h]).all()
    others = torch.ones(B, H, dtype=torch.bool)
    others[0] = others[1, 5] = others[2, 1] = False
    assert torch.isfinite(got.out[:, 0][others]).all() and torch.isfinite(got.lse[others]).all()
    assert torch.isfinite(got.mass[:, :, 0][others]).all()
