"""Fuzz test of the op against the float64 reference: random shapes, dtypes, layouts (batched and varlen), key
groups, GQA, bias and logit scale, with one special value (NaN, ±inf or a huge number) in q, k or v, at a masked
or a visible position. Seeded and small, so the whole file runs in well under a minute on two cores.

What is asserted is what the README ("The op") promises on non-finite input:
- a row that sees no key is dead (out 0, lse −inf, mass 0), whatever its q holds;
- a row that sees keys and has a NaN or infinite score is NaN in out, lse and mass, as in the reference;
  the key mass is NaN exactly where the reference's is;
- a masked key's K never matters: anything there gives the result of a clean K, gradients included;
- a non-finite V entry makes out non-finite on every row that sees it; elsewhere it may leak through 0·NaN in
  P·V (as in SDPA), so those entries are compared only where they are finite;
- every other entry is close to the reference with the tolerances of avar_ops.core.testing (widened by the score
  magnitude for the huge entries), and NaN in the forward never vanishes from dq.
Gradient closeness is checked for fp32 and fp64; bf16 gradients are held to their bound by tests/test_backward.py
on the shared grid, and only their NaN / finite pattern is checked here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
from cases import key_mass_of, key_mass_reference_of

import avar_ops
from avar_ops.core import NUM_GROUPS, testing

N_TRIALS = 90
PLACES = ("none", "q", "k_visible", "k_masked", "v_visible", "v_masked")
VALUES = ("nan", "inf", "-inf", "huge")
HUGE_VISIBLE = 1e4  # dominates the other terms of a score, far from fp32 overflow
HUGE_MASKED = 3e38  # overflows any product with it: only arithmetic-free masking survives it
DIFFERENTIABLE = ("q", "k", "v", "bias", "logit_scale")


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _choice(gen: torch.Generator, options):
    return options[_randint(gen, 0, len(options) - 1)]


@dataclasses.dataclass
class Problem:
    kw: dict  # keyword arguments of avar_ops.attention
    seqs: list  # (q0, q1, k0, k1) per sequence, in packed rows / keys
    rows: int  # packed query rows (B·Lq or Tq)
    keys: int  # packed keys (B·Lk or Tk)
    dense_lq: Optional[int]  # Lq of the batched layout, None for varlen
    dense_lk: Optional[int]
    place: str = "none"
    value: str = "none"
    special: Optional[tuple] = None  # (tensor name, packed row, head or None for all, dim or None for all)


def _row_index(prob: Problem, packed: int, batched_len: Optional[int]):
    """Index of a packed row in the tensor's own layout: (b, i) for batched, (t,) for varlen."""
    return (packed // batched_len, packed % batched_len) if batched_len is not None else (packed,)


def _draw(seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    dtype = _choice(gen, [torch.float32] * 4 + [torch.bfloat16] * 4 + [torch.float64])
    kv_heads = _randint(gen, 1, 2)
    heads = kv_heads * _choice(gen, [1, 2, 3])
    D = _choice(gen, [8, 16, 33, 64])
    causal = _randint(gen, 0, 3) > 0
    kw = {}
    if _randint(gen, 0, 2) == 0:  # varlen, with padded rows and keys past the last sequence
        n = _randint(gen, 1, 3)
        lens_q = [_randint(gen, 0, 20) for _ in range(n)]
        lens_k = [max(lq + _randint(gen, -3, 6), 0) if causal else _randint(gen, 1, 20) for lq in lens_q]
        lens_k = [lk if lq > 0 else 0 for lq, lk in zip(lens_q, lens_k)]
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
        rows, keys = int(cu_q[-1]) + _randint(gen, 0, 2), int(cu_k[-1]) + _randint(gen, 0, 2)
        q = torch.randn(rows, heads, D, generator=gen)
        k = torch.randn(keys, kv_heads, D, generator=gen)
        v = torch.randn(keys, kv_heads, D, generator=gen)
        kg_shape = (keys,)
        seqs = [(int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])) for b in range(n)]
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
        dense_lq = dense_lk = None
    else:
        B, Lq = _randint(gen, 1, 2), _randint(gen, 1, 24)
        Lk = max(Lq + _randint(gen, -3, 8), 1) if causal else _randint(gen, 1, 24)
        q = torch.randn(B, heads, Lq, D, generator=gen).transpose(1, 2)  # [B, Lq, H, D], as HF hands it over
        k = torch.randn(B, Lk, kv_heads, D, generator=gen)
        v = torch.randn(B, Lk, kv_heads, D, generator=gen)
        kg_shape = (B, Lk)
        seqs = [(b * Lq, (b + 1) * Lq, b * Lk, (b + 1) * Lk) for b in range(B)]
        rows, keys, dense_lq, dense_lk = B * Lq, B * Lk, Lq, Lk
    kg = None
    if _randint(gen, 0, 4) > 0:
        kg = torch.randint(0, NUM_GROUPS, kg_shape, generator=gen)
        kg = torch.where(torch.rand(kg_shape, generator=gen) < 0.25, -1, kg).to(torch.int8)
    bias = 1.5 * torch.randn(heads, NUM_GROUPS, generator=gen) if _randint(gen, 0, 2) > 0 else None
    logit_scale = 1.0 + 0.4 * torch.randn(heads, NUM_GROUPS, generator=gen) if _randint(gen, 0, 1) else None

    def qkv(t):  # keeps the strides of the transposed view
        out = torch.empty_strided(t.shape, t.stride(), dtype=dtype)
        out.copy_(t)
        return out

    kw.update(q=qkv(q), k=qkv(k), v=qkv(v), key_group=kg, bias=bias, logit_scale=logit_scale, causal=causal)
    prob = Problem(kw, seqs, rows, keys, dense_lq, dense_lk)
    _place_special(prob, gen)
    return prob


def _groups_packed(prob: Problem) -> torch.Tensor:
    kg = prob.kw["key_group"]
    if kg is None:
        return torch.zeros(prob.keys, dtype=torch.long)
    return kg.reshape(-1).long()  # [keys]


def _visibility(prob: Problem) -> torch.Tensor:
    """[rows, keys]: query row r sees key c (same sequence, causally visible, group ≥ 0)."""
    vis = torch.zeros(prob.rows, prob.keys, dtype=torch.bool)
    live = _groups_packed(prob) >= 0
    for q0, q1, k0, k1 in prob.seqs:
        lq, lk = q1 - q0, k1 - k0
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        block = (j <= i + (lk - lq)) if prob.kw["causal"] else torch.ones(lq, lk, dtype=torch.bool)
        vis[q0:q1, k0:k1] = block & live[None, k0:k1]
    return vis


def _place_special(prob: Problem, gen: torch.Generator) -> None:
    place, value = _choice(gen, PLACES), _choice(gen, VALUES)
    if place == "none":
        return
    vis = _visibility(prob)
    groups = _groups_packed(prob)
    kv_heads, D = prob.kw["k"].shape[-2], prob.kw["k"].shape[-1]
    if place == "q":
        in_seq = [r for q0, q1, _, _ in prob.seqs for r in range(q0, q1)]
        if not in_seq:
            return
        row, head, dim = _choice(gen, in_seq), _randint(gen, 0, prob.kw["q"].shape[-2] - 1), _randint(gen, 0, D - 1)
        name, length = "q", prob.dense_lq
    else:
        name, length = place[0], prob.dense_lk
        if place.endswith("visible"):
            candidates = torch.nonzero(vis.any(0)).flatten().tolist()
            head, dim = _randint(gen, 0, kv_heads - 1), _randint(gen, 0, D - 1)
        else:
            candidates = torch.nonzero(groups < 0).flatten().tolist()
            head = dim = None  # padding garbage: the whole key row, every kv head
        if not candidates:
            return
        row = _choice(gen, candidates)
    x = {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "huge": HUGE_MASKED if place.endswith("masked") else HUGE_VISIBLE,
    }[value]
    t = prob.kw[name]
    idx = _row_index(prob, row, length)
    with torch.no_grad():
        if head is None:
            t[idx] = x
        else:
            t[idx + (head, dim)] = x
    prob.place, prob.value, prob.special = place, value, (name, row, head, dim)


# Outputs in packed form: rows (or keys) first, then heads.
def _pack_rows(prob: Problem, x: torch.Tensor) -> torch.Tensor:  # like q → [rows, H, D]
    return x.reshape(prob.rows, *x.shape[-2:]) if prob.dense_lq is not None else x


def _pack_lse(prob: Problem, x: torch.Tensor) -> torch.Tensor:  # [B, H, Lq] | [H, Tq] → [rows, H]
    return x.permute(0, 2, 1).reshape(prob.rows, -1) if prob.dense_lq is not None else x.t()


def _pack_mass(prob: Problem, x: torch.Tensor) -> torch.Tensor:  # [B, H, Lq, G] | [H, Tq, G] → [rows, H, G]
    return x.permute(0, 2, 1, 3).reshape(prob.rows, -1, NUM_GROUPS) if prob.dense_lq is not None else x.permute(1, 0, 2)


def _pack_key_mass(prob: Problem, x: torch.Tensor) -> torch.Tensor:  # [B, H, Lk] | [H, Tk] → [keys, H]
    return x.permute(0, 2, 1).reshape(prob.keys, -1) if prob.dense_lk is not None else x.t()


def _clean(prob: Problem) -> dict:
    """The inputs with the special value replaced by 0."""
    kw = dict(prob.kw)
    if prob.special is not None:
        name = prob.special[0]
        kw[name] = torch.where(torch.isfinite(kw[name]) & (kw[name].abs() < HUGE_VISIBLE), kw[name], 0)
    return kw


def _score_factor(prob: Problem) -> float:
    """testing.score_magnitude_factor for the largest finite score magnitude of the problem."""
    kw = prob.kw
    q = _pack_rows(prob, kw["q"]).double()
    k = kw["k"].double().reshape(-1, *kw["k"].shape[-2:])
    q = torch.where(torch.isfinite(q), q, 0).abs()  # [rows, H, D]
    live = (_groups_packed(prob) >= 0)[:, None, None]  # masked keys are never scored
    k = torch.where(torch.isfinite(k) & live, k, 0).abs()  # [keys, Hkv, D]
    k = k[:, torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])]  # [keys, H, D]
    dots = torch.einsum("rhd,chd->rch", q, k).amax() if q.numel() and k.numel() else torch.tensor(0.0)
    scale = q.shape[-1] ** -0.5
    gamma = 1.0 if kw["logit_scale"] is None else kw["logit_scale"].abs().max().item()
    beta = 0.0 if kw["bias"] is None else kw["bias"].abs().max().item()
    return testing.score_magnitude_factor(scale * gamma * dots.item() + beta)


def _lowp_yardstick(prob: Problem, clean: dict, ref_clean) -> tuple[float, float]:
    """PyTorch's own bf16 errors (out relative, mass max abs) on the clean inputs, per sequence."""
    kw = clean
    outs, masses, ref_outs, ref_masses = [], [], [], []
    for b, (q0, q1, k0, k1) in enumerate(prob.seqs):
        if q1 == q0:
            continue
        if prob.dense_lq is not None:
            q, k, v = kw["q"][b : b + 1], kw["k"][b : b + 1], kw["v"][b : b + 1]
            kg = kw["key_group"][b : b + 1] if kw["key_group"] is not None else None
        else:
            q, k, v = kw["q"][None, q0:q1], kw["k"][None, k0:k1], kw["v"][None, k0:k1]
            kg = kw["key_group"][None, k0:k1] if kw["key_group"] is not None else None
        o, m = testing.torch_lowp_attention(q, k, v, kg, kw["bias"], kw["logit_scale"], None, kw["causal"])
        outs.append(o[0])  # [lq, H, D]
        masses.append(m[0].transpose(0, 1))  # [lq, H, G]
        ref_outs.append(_pack_rows(prob, ref_clean.out)[q0:q1])
        ref_masses.append(_pack_mass(prob, ref_clean.mass)[q0:q1])
    if not outs:
        return 0.0, 0.0
    return (
        testing.rel_err(torch.cat(outs), torch.cat(ref_outs)),
        testing.max_abs_err(torch.cat(masses), torch.cat(ref_masses)),
    )


def _loss(res, w) -> torch.Tensor:
    lse = torch.where(res.lse == float("-inf"), torch.zeros_like(res.lse), res.lse)  # dead rows: no gradient
    return (res.out.double() * w[0]).sum() + (res.mass.double() * w[1]).sum() + (lse.double() * w[2]).sum()


def _grads(kw: dict, fn, w) -> dict:
    kw = dict(kw)
    names = [n for n in DIFFERENTIABLE if kw.get(n) is not None]
    for n in names:
        kw[n] = kw[n].detach().clone().requires_grad_(True)
    loss = _loss(fn(**kw, return_mass=True), w)
    if not loss.requires_grad:  # no sequence has a row (the reference then builds no graph)
        return {n: torch.zeros_like(kw[n]) for n in names}
    grads = torch.autograd.grad(loss, [kw[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(kw[n]) if g is None else g for n, g in zip(names, grads)}


def _assert_close_where(got: torch.Tensor, ref: torch.Tensor, sel: torch.Tensor, bound: float, what: str) -> None:
    if sel.any():
        err = testing.rel_err(got[sel], ref[sel])
        assert err <= bound, f"{what}: relative error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("seed", range(N_TRIALS))
def test_fuzz_against_reference(seed, monkeypatch):
    prob = _draw(seed)
    kw = prob.kw
    dtype = kw["q"].dtype
    lowp = dtype == torch.bfloat16
    if lowp and seed % 2:  # half the bf16 trials take the bf16 GEMM path, emulated where oneDNN's does not run
        monkeypatch.setenv("AVAR_EMULATE_BF16_GEMM", "1")
    got = avar_ops.attention(**kw, return_mass=True)
    ref = avar_ops.attention_reference(**kw, return_mass=True)
    clean = _clean(prob)
    ref_clean = avar_ops.attention_reference(**clean, return_mass=True)
    factor = _score_factor(prob)
    tag = f"{prob.place}={prob.value}, {dtype}, varlen={prob.dense_lq is None}, causal={kw['causal']}"

    vis = _visibility(prob)  # [rows, keys]
    alive = vis.any(1)  # [rows]
    H, Hkv = kw["q"].shape[-2], kw["k"].shape[-2]
    g_out, r_out, rc_out = (_pack_rows(prob, x) for x in (got.out, ref.out, ref_clean.out))  # [rows, H, D]
    g_lse, r_lse = _pack_lse(prob, got.lse), _pack_lse(prob, ref.lse)  # [rows, H]
    g_mass, r_mass = _pack_mass(prob, got.mass), _pack_mass(prob, ref.mass)  # [rows, H, G]

    # Dead rows, whatever their q holds.
    dead = ~alive
    assert (g_out[dead] == 0).all() and (g_mass[dead] == 0).all(), tag
    assert (g_lse[dead] == float("-inf")).all() and (r_lse[dead] == float("-inf")).all(), tag

    # NaN rows: the same (row, head) pairs as the reference, NaN in lse, mass and out.
    bad = torch.isnan(r_lse) & alive[:, None]  # [rows, H]
    assert torch.equal(torch.isnan(g_lse) & alive[:, None], bad), f"NaN lse rows differ ({tag})"
    assert torch.isnan(g_mass[bad]).all() and torch.isnan(g_out[bad]).all(), tag
    ok = alive[:, None] & ~bad  # [rows, H]
    assert torch.isfinite(g_lse[ok]).all() and torch.isfinite(g_mass[ok]).all(), tag

    # A non-finite V entry: out non-finite on every row that sees it; elsewhere possibly NaN through 0·NaN.
    v_poison = torch.zeros(prob.rows, H, dtype=torch.bool)  # rows that see a non-finite V entry
    v_leak = prob.place.startswith("v_") and prob.value != "huge"
    if v_leak and prob.place == "v_visible":
        _, key, kvh, dim = prob.special
        heads = torch.arange(H) // (H // Hkv) == kvh  # [H]
        v_poison = vis[:, key][:, None] & heads[None, :]
        assert not torch.isfinite(g_out[v_poison][:, dim]).any(), f"a NaN in visible V vanished ({tag})"

    # Closeness everywhere else.
    lse_tol = (testing.LOWP_LSE_ABS if lowp else testing.FP32_LSE_ABS) * factor
    if ok.any():
        err = (g_lse[ok].double() - r_lse[ok]).abs().max().item()
        assert err <= lse_tol, f"lse error {err:.2e} > {lse_tol:.2e} ({tag})"
    if lowp:
        t_out, t_mass = _lowp_yardstick(prob, clean, ref_clean)
        out_bound = testing.lowp_bound(t_out, dtype, testing.LOWP_FWD_FACTOR) * factor
        mass_bound = testing.lowp_bound(t_mass, dtype, testing.LOWP_FWD_FACTOR) * factor
    else:
        out_bound, mass_bound = testing.FP32_OUT_REL * factor, testing.FP32_MASS_ABS * factor
    if ok.any():
        err = testing.max_abs_err(g_mass[ok], r_mass[ok])
        assert err <= mass_bound, f"mass error {err:.2e} > {mass_bound:.2e} ({tag})"
    compare = (ok & ~v_poison)[..., None].expand_as(g_out)  # [rows, H, D]
    if v_leak:
        # Rows that do not see the entry must equal the clean answer wherever the leak left them finite.
        _assert_close_where(g_out, rc_out, compare & torch.isfinite(g_out), out_bound, f"out ({tag})")
    else:
        assert torch.isfinite(g_out[compare]).all(), f"non-finite out on a finite row ({tag})"
        _assert_close_where(g_out, r_out, compare, out_bound, f"out ({tag})")

    # Key mass: NaN exactly where the reference's is, close elsewhere.
    gen = torch.Generator().manual_seed(1000 + seed)
    wq = torch.rand(got.lse.shape, generator=gen) * (torch.rand(got.lse.shape, generator=gen) > 0.3)
    km = key_mass_of(kw, got.lse, wq)
    km_ref = key_mass_reference_of(kw, wq)
    g_km, r_km = _pack_key_mass(prob, km), _pack_key_mass(prob, km_ref)  # [keys, H]
    assert torch.equal(torch.isnan(g_km), torch.isnan(r_km)), f"NaN key masses differ ({tag})"
    finite_km = ~torch.isnan(r_km)
    _assert_close_where(g_km, r_km, finite_km, testing.FP32_OUT_REL * factor, f"key mass ({tag})")

    # Gradients: NaN of the forward never vanishes from dq; a finite forward gives finite, close gradients.
    wgen = torch.Generator().manual_seed(2000 + seed)
    w = [torch.randn(x.shape, generator=wgen, dtype=torch.float64) for x in (got.out, got.mass, got.lse)]
    g_grads = _grads(kw, avar_ops.attention, w)
    poisoned = bad | v_poison  # [rows, H]
    if poisoned.any():
        dq = _pack_rows(prob, g_grads["q"])  # [rows, H, D]
        assert not torch.isfinite(dq[poisoned]).any(), f"NaN of the forward vanished from dq ({tag})"
    elif not v_leak:
        for name, g in g_grads.items():
            assert torch.isfinite(g).all(), f"non-finite d{name} from a finite forward ({tag})"
        if not lowp:
            r_grads = _grads(
                {n: (x.double() if n in ("q", "k", "v") and x is not None else x) for n, x in kw.items()},
                avar_ops.attention_reference,
                w,
            )
            for name in ("q", "k", "v"):
                err = testing.rel_err(g_grads[name], r_grads[name])
                assert err <= testing.FP32_OUT_REL * factor, f"d{name}: relative error {err:.2e} ({tag})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overflowing_scores_give_nan_not_a_dead_row(dtype):
    """Finite inputs whose scores overflow float32 (the float64 reference does not overflow): the row is NaN, as in
    PyTorch's SDPA, never out 0 / lse −inf / mass 0."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 2, 16, generator=gen)
    k = torch.randn(1, 6, 2, 16, generator=gen)
    v = torch.randn(1, 6, 2, 16, generator=gen)
    q[0, 3, 1] = 1e30
    k[0, 1, 1] = 1e30  # rows 3.. of head 1 see key 1: every such score overflows (to +inf or −inf)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    got = avar_ops.attention(q, k, v, return_mass=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), is_causal=True
    )
    assert torch.isnan(sdpa[0, 1, 3]).all()  # the yardstick agrees that this row has no finite answer
    assert torch.isnan(got.out[0, 3, 1]).all() and torch.isnan(got.mass[0, 1, 3]).all()
    assert torch.isnan(got.lse[0, 1, 3])
    assert torch.isfinite(got.out[0, :3]).all() and torch.isfinite(got.out[0, :, 0]).all()
