"""The CUDA kernels against the float64 reference, over the whole shared case grid, in bf16 and fp16; the op
and a decode step of the patched tiny Qwen2.5-VL captured in CUDA graphs.

Tolerances come from avar_ops.core.testing: our error may be a small multiple of PyTorch's own error at the same
precision (plain PyTorch ops on the same low-precision inputs, on the same device).

On a GPU these run the real kernels. Without one, `AVAR_EXTENSION=cuda_emulation` (with avar_ops._C_emu built by
AVAR_BUILD_CUDA_EMULATION=1; scripts/test.sh does both) runs the same kernels and host code on the emulated device
of csrc/attention/cuda/emulation.h, on CPU tensors; the tests that need a real GPU (CUDA graphs, torch.compile's
reduce-overhead, CUDA-only dtype rules) are skipped there.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from cases import CASES, Case, make_inputs
from decode_steps import check_replayed_step, eager_replay, graph_model, run_step

import avar_ops
from avar_ops.core import NUM_GROUPS, attention_reference, key_mass_reference
from avar_ops.core import extension as _extension
from avar_ops.core.testing import (
    BF16_REPLAY_ERR,
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
from avar_ops.hf import apply_to_qwen2_5_vl, collect_masses

EMULATED = os.environ.get("AVAR_EXTENSION") == "cuda_emulation"
DEVICE = "cpu" if EMULATED else "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not EMULATED and not torch.cuda.is_available(),
        reason="no CUDA GPU (AVAR_EXTENSION=cuda_emulation runs these on the emulated device)",
    ),
]
gpu_only = pytest.mark.skipif(EMULATED, reason="needs a real GPU, not the emulated device")

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
    args = dict(
        key_group=kw.get("key_group"), bias=kw.get("bias"), logit_scale=kw.get("logit_scale"), causal=kw["causal"]
    )
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
        o, m = torch_lowp_attention(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], kg, args["bias"], args["logit_scale"], causal=args["causal"]
        )
        rows = torch.arange(q0, q1, device=q.device)
        out = out.index_copy(0, rows, o[0])
        mass = mass.index_copy(1, rows, m[0].float())
    return out, mass


def _lowp_key_mass(kw, w):
    args = dict(
        key_group=kw.get("key_group"), bias=kw.get("bias"), logit_scale=kw.get("logit_scale"), causal=kw["causal"]
    )
    q, k = kw["q"], kw["k"]
    if kw.get("cu_seqlens_q") is None:
        return torch_lowp_key_mass(q, k, w, **args).float()
    result = q.new_zeros(q.shape[1], k.shape[0], dtype=torch.float32)  # [H, Tk]
    for q0, q1, k0, k1 in _sequences(kw):
        if q1 == q0 or k1 == k0:
            continue
        kg = None if args["key_group"] is None else args["key_group"][k0:k1][None]
        km = torch_lowp_key_mass(
            q[None, q0:q1],
            k[None, k0:k1],
            w[None, :, q0:q1],
            kg,
            args["bias"],
            args["logit_scale"],
            causal=args["causal"],
        )
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
    _check_forward(make_inputs(case, dtype, DEVICE, seed=1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("L1025_gqa7_d128", "varlen_ragged", "dead_rows")], ids=lambda c: c.name
)
def test_forward_without_mass(case, dtype):
    _check_forward(make_inputs(case, dtype, DEVICE, seed=3), dtype, return_mass=False)


def _sizes(case: Case):
    """(batch, max query length, max key length) of a case as the host code sees them."""
    lens_q = case.varlen if case.varlen is not None else (case.len_q,)
    max_k = max(lq + case.lk for lq in lens_q) if case.varlen is not None else case.lk
    batch = len(lens_q) if case.varlen is not None else case.batch
    return batch, max(lens_q), max_k


def _decode_splits(case: Case) -> int:
    batch, max_q, max_k = _sizes(case)
    return _extension.load_extension().cuda_decode_splits(batch, case.heads, case.kv_heads, max_q, max_k, case.head_dim)


@pytest.fixture
def forced_splits():
    """Forces the split-KV path whatever the GPU's size (the heuristic splits less on a small MIG slice)."""
    ext = _extension.load_extension()

    def force(n):
        ext.set_cuda_decode_splits(n)

    yield force
    ext.set_cuda_decode_splits(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("splits", [3, 64], ids=["3_splits", "64_splits"])
def test_decode_split_path(case, dtype, splits, forced_splits):
    # 64 splits leave some splits without a key tile: their partials must drop out of the merge.
    forced_splits(splits)
    assert _decode_splits(case) == splits
    _check_forward(make_inputs(case, dtype, DEVICE, seed=4), dtype)


def _grad_leaves(kw):
    return [(name, kw[name]) for name in ("q", "k", "v", "bias", "logit_scale") if kw.get(name) is not None]


def _grads(loss, inputs):
    """d loss / d inputs, zeros where the loss does not depend on an input (every sequence empty)."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def _check_backward(kw, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    names, leaves = zip(*_grad_leaves(kw))

    ours = avar_ops.attention(**kw, return_mass=True)
    d_out = torch.randn(ours.out.shape, generator=gen, device=DEVICE).to(dtype)  # like out
    d_mass = torch.randn(ours.mass.shape, generator=gen, device=DEVICE)  # [B, H, Lq, G] | [H, Tq, G]
    loss = (ours.out.float() * d_out.float()).sum() + (ours.mass * d_mass).sum()
    grads = _grads(loss, leaves)

    kw64 = _upcast(kw, requires_grad=True)
    ref = attention_reference(**kw64, return_mass=True)
    ref_loss = (ref.out * d_out.double()).sum() + (ref.mass * d_mass.double()).sum()
    ref_grads = _grads(ref_loss, [kw64[n] for n in names])

    t_out, t_mass = _lowp_attention(kw)
    t_loss = (t_out.float() * d_out.float()).sum() + (t_mass * d_mass).sum()
    t_grads = _grads(t_loss, leaves)

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
    _check_backward(make_inputs(case, dtype, DEVICE, seed=2, requires_grad=True), dtype, seed=5)


# Backward splits: each key block's steps (query heads × query blocks) shared by several CTAs, whose dK / dV
# partials are summed afterwards. Split counts that do not divide the steps cut runs in the middle of a head;
# more splits than steps leave some CTAs without work, whose zero partials must still be summed in.
BACKWARD_SPLIT_CASES = [
    Case("bwd_split_gqa7_d128", batch=1, len_q=200, len_k=None, heads=14, kv_heads=2, head_dim=128),
    Case("bwd_split_gqa2_d80_noncausal", batch=2, len_q=70, len_k=None, heads=4, kv_heads=2, head_dim=80, causal=False),
    Case("bwd_split_varlen", varlen=(0, 37, 90), len_k=10, heads=4, kv_heads=1, head_dim=64, groups="dead_rows"),
]


@pytest.fixture
def forced_backward_splits():
    ext = _extension.load_extension()
    yield ext.set_cuda_backward_splits
    ext.set_cuda_backward_splits(0)


@pytest.mark.parametrize("case", BACKWARD_SPLIT_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("splits", [2, 5, 40], ids=["2_splits", "5_splits", "40_splits"])
def test_backward_split_path(case, splits, forced_backward_splits):
    forced_backward_splits(splits)
    batch, max_q, max_k = _sizes(case)
    ext = _extension.load_extension()
    assert ext.cuda_backward_splits(batch, case.heads, case.kv_heads, max_q, max_k, case.head_dim) == splits
    dtype = torch.bfloat16
    _check_backward(make_inputs(case, dtype, DEVICE, seed=11, requires_grad=True), dtype, seed=12)


def test_backward_splits_heuristic(monkeypatch):
    if EMULATED:
        monkeypatch.setenv("AVAR_EMULATED_SM_COUNT", "132")  # an H100's / H200's count
    sms = 132 if EMULATED else torch.cuda.get_device_properties(0).multi_processor_count
    ext = _extension.load_extension()
    # A 7B-shaped short sequence (28 query heads on 4 kv heads, 1025 tokens): with 64-key blocks, 17 key blocks ×
    # 4 kv heads = 68 CTAs.
    ext.set_cuda_tile("8x16")
    try:
        got = ext.cuda_backward_splits(1, 28, 4, 1025, 1025, 128)
    finally:
        ext.set_cuda_tile("auto")
    if 68 < sms:
        assert 2 <= got and 68 * (got - 1) < 2 * sms, f"{got} splits of 68 CTAs on {sms} SMs"
    else:
        assert got == 1
    assert ext.cuda_backward_splits(8, 28, 4, 8192, 8192, 128) == 1  # 8 × 128 × 4 CTAs fill any GPU
    assert ext.cuda_backward_splits(1, 1, 1, 1, 1, 64) == 1  # a single step cannot be shared


# ---------------------------------------------------------------------------------------------------------
# Tile shapes: the host picks a tile from the device's opt-in shared memory per block and the shape asked for
# (set_cuda_tile). Every plan the dispatch can make for the target archs runs here against the reference: the
# emulated device launches with the plan's shared memory, and set_cuda_smem_limit makes the host plan as it would
# on a device with that limit.

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the target archs.
ARCH_SMEM = {
    "sm_80": 166912,
    "sm_86": 101376,
    "sm_89": 101376,
    "sm_90": 232448,
    "sm_100": 232448,
    "sm_120": 101376,
}
SHAPES = ["8x16", "4x32"]
HEAD_DIMS = [64, 80, 128]
# One limit per distinct plan (test_arch_plans_are_covered checks that these reach every plan of ARCH_SMEM).
PLAN_LIMITS = {"163KB": ARCH_SMEM["sm_80"], "99KB": ARCH_SMEM["sm_86"]}


def test_every_arch_gets_a_plan_that_fits():
    ext = _extension.load_extension()
    for arch, limit in ARCH_SMEM.items():
        for d in HEAD_DIMS:
            for shape in ["auto", *SHAPES]:
                plan = ext.cuda_tiles(d, limit, shape)
                where = f"{arch}, D={d}, {shape}: {plan}"
                assert plan["forward_smem"] <= limit and plan["backward_smem"] <= limit, where
                assert shape == "auto" or plan["forward"] == shape, where
                assert plan["forward_warps"] * (16 if plan["forward"] == "8x16" else 32) == plan["forward_block_m"]
                assert plan["backward_block_n"] == 16 * plan["backward_warps"], where
    # The head-dim-128 forward of 8 warps × 16 rows takes 64-key tiles where they fit, 32 where they do not.
    assert ext.cuda_tiles(128, ARCH_SMEM["sm_90"], "8x16")["forward_block_n"] == 64
    assert ext.cuda_tiles(128, ARCH_SMEM["sm_86"], "8x16")["forward_block_n"] == 32
    assert ext.cuda_tiles(128, ARCH_SMEM["sm_86"], "8x16")["forward_smem"] <= ARCH_SMEM["sm_86"]
    # 128-key backward blocks where they fit.
    assert ext.cuda_tiles(128, ARCH_SMEM["sm_80"], "4x32")["backward_block_n"] == 128
    assert ext.cuda_tiles(80, ARCH_SMEM["sm_120"], "4x32")["backward_block_n"] == 64
    with pytest.raises(RuntimeError, match="needs .* bytes of shared memory per block; this device allows 48000"):
        ext.cuda_tiles(128, 48000, "8x16")


def test_arch_plans_are_covered():
    ext = _extension.load_extension()

    def plans(limits):
        return {
            (d, s, tuple(sorted(ext.cuda_tiles(d, lim, s).items())))
            for lim in limits
            for d in HEAD_DIMS
            for s in SHAPES
        }

    assert plans(ARCH_SMEM.values()) == plans(PLAN_LIMITS.values())


@pytest.fixture(params=[(s, lim) for s in SHAPES for lim in PLAN_LIMITS], ids=lambda p: f"{p[0]}_{p[1]}")
def tile_plan(request):
    """Runs the test under one tile shape and one arch's shared-memory limit."""
    shape, limit = request.param
    ext = _extension.load_extension()
    ext.set_cuda_tile(shape)
    ext.set_cuda_smem_limit(PLAN_LIMITS[limit])
    yield shape, PLAN_LIMITS[limit]
    ext.set_cuda_tile("auto")
    ext.set_cuda_smem_limit(0)


TILE_CASES = [
    c
    for c in CASES
    if c.name
    in (
        "L1",
        "L17_gqa4_d64",
        "L113_gqa7_d80",
        "L113_gqa1_d128_noncausal",
        "decode_Lq_lt_Lk",
        "dead_rows",
        "varlen_ragged",
        "varlen_decode",
    )
] + [Case("L300_gqa2_d128", batch=1, len_q=300, heads=4, kv_heads=2, head_dim=128, logit_scale="random")]


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: c.name)
def test_tiles_forward(case, tile_plan):
    shape, limit = tile_plan
    plan = _extension.load_extension().cuda_tiles(case.head_dim)
    assert plan["forward"] == shape and plan["forward_smem"] <= limit
    dtype = torch.bfloat16
    for seed in (21, 22):
        _check_forward(make_inputs(case, dtype, DEVICE, seed=seed), dtype)


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: c.name)
def test_tiles_backward(case, tile_plan):
    shape, limit = tile_plan
    plan = _extension.load_extension().cuda_tiles(case.head_dim)
    assert plan["backward_smem"] <= limit
    dtype = torch.float16
    _check_backward(make_inputs(case, dtype, DEVICE, seed=23, requires_grad=True), dtype, seed=24)


# ---------------------------------------------------------------------------------------------------------
# GQA packing: in decode and short chunks the query heads that share a kv head are rows of one forward tile.


@pytest.fixture
def gqa_packing():
    ext = _extension.load_extension()
    yield ext.set_cuda_gqa_packing
    ext.set_cuda_gqa_packing("auto")


def test_gqa_packing_heuristic(gqa_packing):
    ext = _extension.load_extension()
    assert ext.cuda_gqa_pack(28, 4, 1) == 7  # Qwen2.5-VL-7B decode
    assert ext.cuda_gqa_pack(28, 4, 100) == 7  # a short chunk: 700 packed rows in 6 tiles instead of 7
    assert ext.cuda_gqa_pack(28, 4, 110) == 1  # 770 rows take 7 tiles either way
    assert ext.cuda_gqa_pack(28, 4, 4096) == 1  # prefill
    assert ext.cuda_gqa_pack(8, 8, 1) == 1  # no GQA
    assert ext.cuda_gqa_pack(64, 1, 1) == 1  # 64 heads per kv head: more than a tile packs
    gqa_packing("off")
    assert ext.cuda_gqa_pack(28, 4, 1) == 1
    gqa_packing("on")
    assert ext.cuda_gqa_pack(28, 4, 4096) == 7
    with pytest.raises(ValueError, match="'auto', 'off' or 'on'"):
        ext.set_cuda_gqa_packing("sometimes")


def test_packed_decode_splits_count_the_packed_rows(monkeypatch):
    if EMULATED:
        monkeypatch.setenv("AVAR_EMULATED_SM_COUNT", "132")
    sms = 132 if EMULATED else torch.cuda.get_device_properties(0).multi_processor_count
    ext = _extension.load_extension()
    # Qwen2.5-VL-7B decode, one sequence, 8k cache: packed, 4 CTAs (one per kv head) before the split, not 28.
    splits = ext.cuda_decode_splits(1, 28, 4, 1, 8192, 128)
    if 2 * 4 <= sms:
        assert splits > 1 and 4 * (splits - 1) < 2 * sms, f"{splits} splits of 4 CTAs on {sms} SMs"
        assert splits >= ext.cuda_decode_splits(1, 28, 28, 1, 8192, 128)


GQA_DECODE_CASES = [
    Case("dec_gqa1_d64", batch=2, len_q=1, len_k=333, heads=3, kv_heads=3, head_dim=64),
    Case("dec_gqa2_d80", batch=2, len_q=1, len_k=301, heads=4, kv_heads=2, head_dim=80, logit_scale="random"),
    Case("dec_gqa7_d128", batch=1, len_q=1, len_k=517, heads=14, kv_heads=2, head_dim=128, logit_scale="random"),
    Case("dec_gqa7_L3_d64", batch=2, len_q=3, len_k=130, heads=7, kv_heads=1, head_dim=64, bias="shared"),
    Case("dec_gqa7_dead_rows", batch=1, len_q=4, len_k=10, heads=7, kv_heads=1, groups="dead_rows"),
    Case("dec_gqa7_causal_past_tile", batch=1, len_q=40, len_k=90, heads=7, kv_heads=1, head_dim=80),
    Case("dec_gqa2_varlen", varlen=(1, 3, 0, 2), len_k=77, heads=4, kv_heads=2, head_dim=128, logit_scale="random"),
    Case("dec_gqa7_noncausal", batch=1, len_q=2, len_k=70, heads=7, kv_heads=1, head_dim=64, causal=False),
]


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("case", GQA_DECODE_CASES, ids=lambda c: c.name)
def test_gqa_packed_forward(case, packing, gqa_packing):
    gqa_packing(packing)
    batch, max_q, _ = _sizes(case)
    rep = case.heads // case.kv_heads
    assert _extension.load_extension().cuda_gqa_pack(case.heads, case.kv_heads, max_q) == (
        rep if packing == "on" else 1
    )
    for dtype in DTYPES:
        for seed in (31, 32):
            _check_forward(make_inputs(case, dtype, DEVICE, seed=seed), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", GQA_DECODE_CASES[2:7], ids=lambda c: c.name)
def test_gqa_packed_split_forward(case, shape, gqa_packing, forced_splits):
    # Packed rows with the key splits merged afterwards; 3 splits of short caches leave some splits empty.
    gqa_packing("on")
    forced_splits(3)
    ext = _extension.load_extension()
    ext.set_cuda_tile(shape)
    try:
        _check_forward(make_inputs(case, torch.bfloat16, DEVICE, seed=33), torch.bfloat16)
    finally:
        ext.set_cuda_tile("auto")


@pytest.mark.parametrize("splits", [1, 3])
def test_gqa_packed_auto_decode_matches_unpacked(splits, gqa_packing, forced_splits):
    # The heuristic packs this decode step; packing changes which rows share a tile, not what a row computes, so the
    # packed and unpacked kernels agree to the last bit (same keys, same tiles, same order per row) for the same
    # key splits.
    forced_splits(splits)
    case = Case(
        "qwen7b_decode_slice", batch=2, len_q=1, len_k=700, heads=7, kv_heads=1, head_dim=128, logit_scale="random"
    )
    assert _extension.load_extension().cuda_gqa_pack(7, 1, 1) == 7
    kw = make_inputs(case, torch.bfloat16, DEVICE, seed=34)
    packed = avar_ops.attention(**kw, return_mass=True)
    gqa_packing("off")
    unpacked = avar_ops.attention(**kw, return_mass=True)
    assert torch.equal(packed.out, unpacked.out)
    assert torch.equal(packed.lse, unpacked.lse)
    assert torch.equal(packed.mass, unpacked.mass)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_key_mass(case, dtype):
    kw = make_inputs(case, dtype, DEVICE, seed=6)
    fwd = avar_ops.attention(**kw)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    w = torch.rand(fwd.lse.shape, generator=gen, device=DEVICE)  # [B, H, Lq] | [H, Tq]
    extra = {n: kw[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") if n in kw}
    common = dict(
        key_group=kw.get("key_group"), bias=kw.get("bias"), logit_scale=kw.get("logit_scale"), causal=kw["causal"]
    )
    ours = avar_ops.attention_key_mass(kw["q"], kw["k"], fwd.lse, w, **common, **extra)
    kw64 = _upcast(kw)
    ref = key_mass_reference(
        kw64["q"],
        kw64["k"],
        w,
        key_group=kw.get("key_group"),
        bias=kw64.get("bias"),
        logit_scale=kw64.get("logit_scale"),
        causal=kw["causal"],
        cu_seqlens_q=kw.get("cu_seqlens_q"),
        cu_seqlens_k=kw.get("cu_seqlens_k"),
    )
    theirs = _lowp_key_mass(kw, w)
    assert torch.isfinite(ours).all()
    bound = lowp_bound(rel_err(theirs, ref), dtype, LOWP_FWD_FACTOR)
    err = rel_err(ours, ref)
    assert err <= bound, f"key mass rel error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument.


@gpu_only
def test_rejects_fp32_on_cuda():
    kw = make_inputs(CASES[1], torch.float32, DEVICE)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        avar_ops.attention(**kw)


def test_rejects_head_dim_96():
    kw = make_inputs(dataclasses.replace(CASES[1], head_dim=96), torch.bfloat16, DEVICE)
    with pytest.raises(ValueError, match="head dim 96"):
        avar_ops.attention(**kw)


def test_rejects_misaligned_stride():
    B, L, H, D = 2, 33, 4, 64
    q = torch.randn(B, L, H, D + 1, device=DEVICE, dtype=torch.bfloat16)[..., :D]  # head stride D + 1
    k = torch.randn(B, L, 1, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(B, L, 1, D, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q must be 16-byte aligned"):
        avar_ops.attention(q, k, v)


def test_rejects_misaligned_pointer():
    B, L, Hkv, D = 2, 33, 1, 64
    q = torch.randn(B, L, 4, D, device=DEVICE, dtype=torch.bfloat16)
    flat = torch.randn(B * L * Hkv * D + 1, device=DEVICE, dtype=torch.bfloat16)
    k = flat[1:].view(B, L, Hkv, D)  # data pointer 2 bytes past an aligned address
    v = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="k must be 16-byte aligned"):
        avar_ops.attention(q, k, v)


# ----------------------------------------------------------------------------------------------------------
# No host-device synchronisation: with the value checks off (their default on CUDA) a call can be captured in a
# CUDA graph. The graph is replayed on inputs written in place, as a decode loop would.


@pytest.fixture
def checks_off():
    avar_ops.set_input_checks(False)
    yield
    avar_ops.set_input_checks(True)


def _graph_inputs(seed):
    case = Case("graph_decode", batch=2, len_q=1, len_k=600, heads=8, kv_heads=2, head_dim=64)
    return make_inputs(case, torch.bfloat16, DEVICE, seed=seed)


@gpu_only
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_forward_captures_in_a_cuda_graph(varlen, checks_off):
    kw = _graph_inputs(seed=8)
    if varlen:
        case = Case("graph_varlen", varlen=(1, 3), len_k=500, heads=8, kv_heads=2, head_dim=64)
        kw = make_inputs(case, torch.bfloat16, DEVICE, seed=8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (kernel attributes, allocator pools)
        avar_ops.attention(**kw, return_mass=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = avar_ops.attention(**kw, return_mass=True)

    fresh = _graph_inputs(seed=9) if not varlen else make_inputs(case, torch.bfloat16, DEVICE, seed=9)
    for name in ("q", "k", "v"):
        kw[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    eager = avar_ops.attention(**kw, return_mass=True)
    assert torch.equal(static.out, eager.out)
    assert torch.equal(static.lse, eager.lse)
    assert torch.equal(static.mass, eager.mass)


@gpu_only
def test_reduce_overhead_compile(checks_off):
    kw = _graph_inputs(seed=10)

    def step(q, k, v):
        res = avar_ops.attention(q, k, v, kw["key_group"], kw["bias"], logit_scale=kw["logit_scale"], return_mass=True)
        return res.out, res.mass

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # the first calls record the graph, later ones replay it
        out, mass = compiled(kw["q"], kw["k"], kw["v"])
    eager_out, eager_mass = step(kw["q"], kw["k"], kw["v"])
    assert torch.equal(out, eager_out)
    assert torch.equal(mass, eager_mass)


def _graph_replay(model, step, warm_cache, cache, new_ids):
    """Capture the decode step in a CUDA graph, write the new ids into its input buffer and replay it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on its own cache (a step grows its cache)
        run_step(model, step, warm_cache)
    torch.cuda.current_stream().wait_stream(side)
    # The graph reads memory allocated before the capture: this cache's keys and values, which the captured step
    # replaces by longer ones (kept here until the replay), and the patch's id history of the cache, the prompt's
    # input_ids (kept by the caller's batch).
    before = [(layer.keys, layer.values) for layer in cache.layers]
    graph = torch.cuda.CUDAGraph()
    with collect_masses(model) as rec, torch.cuda.graph(graph):
        out = model(**step, past_key_values=cache)
    step["input_ids"].copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys[:, :, :-1], keys) and torch.equal(layer.values[:, :, :-1], values)
    return out.logits.float(), [m.float() for m in rec.masses]


@gpu_only
def test_patched_decode_step_captures_in_a_cuda_graph(checks_off):
    model, processor = graph_model()
    check_replayed_step(model.cuda(), processor, "cuda", _graph_replay)


@pytest.mark.skipif(not EMULATED, reason="on a GPU the step is captured and replayed (the test above)")
def test_patched_decode_step_on_the_emulated_device():
    # The patched bf16 model's attention runs on the emulated CUDA kernels here: prefill, then the decode step.
    model, processor = graph_model()
    check_replayed_step(model, processor, "cpu", eager_replay)


@gpu_only
def test_host_tables_follow_in_place_changes():
    # Tables given on the host are copied to the GPU once; an in-place change must reach the next forward.
    model, processor = graph_model()
    model = model.cuda()
    ids = processor.tokenizer("What colour is the square?", return_tensors="pt")["input_ids"].cuda()  # [1, L]
    bias = torch.tensor([0.0, 2.0, -1.0, 1.0])  # [4], on the host
    groups = (torch.arange(ids.shape[1], device="cuda") % 4).to(torch.int8)[None]  # [1, L]: every group
    handle = apply_to_qwen2_5_vl(model, bias=bias)
    try:
        handle.set_key_groups(groups)
        with torch.no_grad():
            biased = model(input_ids=ids).logits.float()
            bias.zero_()
            zeroed = model(input_ids=ids).logits.float()
            handle.set_bias(None)
            plain = model(input_ids=ids).logits.float()
    finally:
        handle.revert()
    assert rel_err(zeroed, plain) <= BF16_REPLAY_ERR
    assert rel_err(biased, plain) > 10 * BF16_REPLAY_ERR
