"""The emulated CUDA device itself (csrc/attention/cuda/emulation.h): its warp instructions compute what the PTX
ISA says, it refuses launches beyond the chosen GPU's limits, and each of its detectors (deadlock, divergent warp,
misaligned ldmatrix, shared-memory races, cp.async read before its wait, uninitialised shared memory, global
accesses outside the op's tensors) catches a kernel that plants the bug it looks for, while correct kernels pass.

These run against avar_ops._C_emu (AVAR_EXTENSION=cuda_emulation), in scripts/test.sh's second pass.
"""

from __future__ import annotations

import os

import pytest
import torch
from cases import CASES, make_inputs
from test_cuda import _check_backward, _check_forward

import avar_ops
from avar_ops.core import load_extension

pytestmark = pytest.mark.skipif(
    os.environ.get("AVAR_EXTENSION") != "cuda_emulation",
    reason="tests the emulated device: run with AVAR_EXTENSION=cuda_emulation (scripts/test.sh's second pass)",
)

PROFILES = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"]
# CUDA C++ Programming Guide, technical specifications per compute capability: dynamic shared memory per CTA
# after opting in (163 KB, 99 KB, 227 KB).
OPTIN = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_100": 232448, "sm_120": 101376}
SEEDS = [1, 2, 3]


@pytest.fixture
def ext():
    """The extension, with the default profile, seed and checks restored after the test."""
    e = load_extension()
    profile, seed, checks = e.arch_profile()["name"], e.emulation_seed(), e.emulation_checks()
    yield e
    e.set_arch_profile(profile)
    e.set_emulation_seed(seed)
    e.set_emulation_checks(checks)


@pytest.mark.parametrize("name", ["mma", "mma_trans"])
def test_ldmatrix_and_mma_compute_the_product(name, ext):
    # A 16×16 by 16×8 (16) product of exact bf16 values, loaded with the kernels' own ldmatrix patterns.
    assert ext.emulation_selftest(name) == ""


@pytest.mark.parametrize(
    "name, message",
    [
        ("deadlock", "deadlock: 32 of 64 threads wait"),
        ("divergent_warp", "different warp instructions"),
        ("misaligned_ldmatrix", "not a 16-byte aligned row"),
        ("threads_2048", "2048 threads per CTA; the device allows 1 to 1024"),
        ("grid_y_65536", "grid (1, 65536, 1)"),
        ("registers_255x512", "255 registers per thread × 512 threads"),
    ],
)
def test_faults_are_reported(name, message, ext):
    assert message in ext.emulation_selftest(name)


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_refuse_shared_memory_past_their_optin_limit(profile, ext):
    ext.set_arch_profile(profile)
    info = ext.arch_profile()
    assert info["name"] == profile and info["smem_optin"] == OPTIN[profile]
    assert info["max_threads_per_block"] == 1024 and info["max_registers_per_thread"] == 255
    limit = OPTIN[profile]
    assert ext.emulation_selftest(f"smem:{limit}") == ""
    err = ext.emulation_selftest(f"smem:{limit + 16}")
    assert f"asks for {limit + 16} bytes of dynamic shared memory per CTA; the device allows {limit}" in err
    assert f"emulated {profile}" in err and "empty_kernel" in err


def test_unknown_profile_is_refused(ext):
    with pytest.raises(ValueError, match=r"set_arch_profile: name must be one of sm_80, .*sm_120, got 'sm_75'"):
        ext.set_arch_profile("sm_75")


def test_sm_count_follows_the_profile(ext, monkeypatch):
    monkeypatch.delenv("AVAR_EMULATED_SM_COUNT", raising=False)
    ext.set_arch_profile("sm_90")
    assert ext.arch_profile()["sm_count"] == 132  # an H100 SXM's
    monkeypatch.setenv("AVAR_EMULATED_SM_COUNT", "7")
    assert ext.arch_profile()["sm_count"] == 7


# Each planted bug, the words of the report and who it must name. Shared-memory races are reported whichever of
# the two accesses the seed runs first.
PLANTED = [
    ("missing_barrier", ["shared-memory race", "warp 0", "warp 1", "missing_barrier_kernel", "shared-memory byte"]),
    ("overwrite_in_flight", ["shared-memory race", "warp 0", "warp 1", "overwrite_in_flight_kernel"]),
    ("unpublished_copy", ["shared-memory race", "warp 0", "warp 1", "unpublished_copy_kernel"]),
    ("shared_atomics_and_read", ["shared-memory race", "warp 0", "warp 1", "atomically"]),
    ("early_read", ["before the cp.async.wait_group that covers the copy", "early_read_kernel"]),
    ("uninitialised_read", ["which no thread of this CTA has written", "uninitialised_read_kernel"]),
    ("global_read_past_end", ["out-of-bounds global access: reads 4 bytes", "past the end of 'src'"]),
    ("global_write_past_end", ["out-of-bounds global access: writes 4 bytes", "past the end of 'out'"]),
    ("cp_async_source_past_end", ["out-of-bounds global access: reads 16 bytes", "past the end of 'src'"]),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, words", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bugs_are_caught(name, words, seed, ext):
    ext.set_emulation_seed(seed)
    err = ext.emulation_selftest(name)
    for w in words:
        assert w in err, f"{name} (seed {seed}): {w!r} not in {err!r}"


@pytest.mark.parametrize("seed", SEEDS)
def test_correct_kernels_pass_the_checks(seed, ext):
    # The counterparts of the planted bugs: atomics of several warps on one shared float, reads inside the buffer.
    ext.set_emulation_seed(seed)
    assert ext.emulation_selftest("shared_atomics") == ""
    assert ext.emulation_selftest("global_read_in_bounds") == ""


def test_planted_bugs_pass_unseen_without_the_checks(ext):
    # The detectors, not some other failure, are what refuse them.
    ext.set_emulation_checks(False)
    for name in ("missing_barrier", "unpublished_copy", "global_read_past_end", "uninitialised_read"):
        assert ext.emulation_selftest(name) == "", name


def test_warp_order_changes_with_the_seed_and_replays(ext):
    orders = {}
    for seed in range(1, 9):
        ext.set_emulation_seed(seed)
        orders[seed] = ext.emulation_selftest("arrival_order")
        assert sorted(orders[seed].split(",")) == [str(w) for w in range(8)], orders[seed]
    assert len(set(orders.values())) >= 3, orders
    ext.set_emulation_seed(5)
    assert ext.emulation_selftest("arrival_order") == orders[5]


def test_cp_async_lands_at_a_random_point_before_its_wait(ext):
    # Checks off, so that the early reads are allowed: across seeds a copy is seen at different points before its
    # wait (or only after it), and always after it.
    ext.set_emulation_checks(False)
    seen = set()
    for seed in range(1, 17):
        ext.set_emulation_seed(seed)
        values = ext.emulation_selftest("landing").split(",")
        assert values[3] == "2.000000", values
        assert values[:3] == sorted(values[:3], key=lambda v: v != "nan"), f"a landed copy cannot unland: {values}"
        seen.add(values.index("2.000000"))
    assert len(seen) >= 3, seen


@pytest.mark.parametrize("seed", SEEDS)
def test_kernels_pass_the_checks_under_several_seeds(seed, ext):
    # Forward (plain and split-KV), backward and key mass of a GQA case, each under another interleaving of the
    # warps and other cp.async landing points, with the checks on; results against the float64 reference.
    ext.set_emulation_seed(seed)
    case = next(c for c in CASES if c.name == "L113_gqa7_d80")
    dtype = torch.bfloat16
    _check_forward(make_inputs(case, dtype, "cpu", seed=seed), dtype)
    _check_backward(make_inputs(case, dtype, "cpu", seed=seed, requires_grad=True), dtype, seed=seed + 10)
    ext.set_cuda_decode_splits(3)
    try:
        _check_forward(make_inputs(case, dtype, "cpu", seed=seed), dtype)
    finally:
        ext.set_cuda_decode_splits(0)


def _forward_once(head_dim):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 130, 4, head_dim, generator=gen).bfloat16()  # [B, L, H, D]
    k = torch.randn(1, 130, 2, head_dim, generator=gen).bfloat16()  # [B, L, Hkv, D]
    v = torch.randn(1, 130, 2, head_dim, generator=gen).bfloat16()
    return avar_ops.attention(q, k, v, causal=True)


@pytest.fixture
def tile_settings(ext):
    """The tile request and the planning limit, restored after the test."""
    yield ext
    ext.set_cuda_tile("auto")
    ext.set_cuda_smem_limit(0)


# Every kernel configuration the dispatch can choose launches within every arch profile's limits: the tile is
# planned from the device's opt-in shared memory (before the run-time choice, the head-dim-128 forward asked for
# 105,984 bytes, past the 101,376 of sm_86 / sm_89 / sm_120, and failed there).
@pytest.mark.parametrize("tile", ["8x16", "4x32"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_launches_every_tile(profile, head_dim, tile, tile_settings):
    tile_settings.set_arch_profile(profile)
    tile_settings.set_cuda_tile(tile)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 130, 4, head_dim, generator=gen).bfloat16().requires_grad_()  # [B, L, H, D]
    k = torch.randn(1, 130, 2, head_dim, generator=gen).bfloat16().requires_grad_()  # [B, L, Hkv, D]
    v = torch.randn(1, 130, 2, head_dim, generator=gen).bfloat16().requires_grad_()
    for causal in (True, False):
        res = avar_ops.attention(q, k, v, causal=causal, return_mass=True)
        grads = torch.autograd.grad(res.out.float().sum() + res.mass.sum(), (q, k, v))
        assert torch.isfinite(res.out.float()).all()
        assert all(torch.isfinite(g.float()).all() for g in grads)


def test_a_refused_launch_names_kernel_shared_memory_and_device(tile_settings):
    ext = tile_settings
    ext.set_arch_profile("sm_86")
    ext.set_cuda_smem_limit(166912)  # planned as on sm_80: the 64-key tile, past sm_86's opt-in limit
    with pytest.raises(RuntimeError) as info:
        _forward_once(128)
    msg = str(info.value)
    for words in (
        "fwd_kernel<__nv_bfloat16, 128, true, ",  # the tile shape and key block follow
        "105984 bytes of dynamic shared memory",
        "allows 101376",
        "emulated sm_86 (compute capability 8.6, A10 limits)",
    ):
        assert words in msg, msg
