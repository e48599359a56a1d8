"""avar_ops.metrics against hand-written float64 versions that use full attention maps, as the published
method does with eager attention; the masses fed to the metrics come from the fused op on the same q, k, v.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import avar_ops
from avar_ops import Group
from avar_ops.core.testing import FP32_MASS_ABS, FP64_REDUCTION_REL, max_abs_err
from avar_ops.method import agto_losses, vas, visual_reward

F32_EPS = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------- problem setup


@dataclasses.dataclass
class Layout:
    key_group: torch.Tensor  # int8 [B, L]
    query: torch.Tensor  # bool [B, L], user-turn text
    image: torch.Tensor  # bool [B, L]
    system: torch.Tensor  # bool [B, L]
    response: torch.Tensor  # bool [B, L]


def make_layout(batch: int, length: int, gen: torch.Generator, drop=()) -> Layout:
    """Random chat-like layouts, one per sample: [system | template | user text | image | user text | template
    | response], padded left or right with masked keys. drop: (sample, part) pairs whose span is left out."""

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    longest = 6 + 2 + 3 + 10 + 6 + 2  # the spans below at their longest
    if length < longest + 3:
        raise ValueError(f"make_layout: length must be >= {longest + 3} to leave room for a response, got {length}")

    groups = torch.full((batch, length), Group.MASKED, dtype=torch.int8)  # [B, L]
    response = torch.zeros(batch, length, dtype=torch.bool)  # [B, L]
    for b in range(batch):
        parts = [
            ("system", Group.SYSTEM, randint(2, 6)),
            ("template", Group.OTHER, randint(1, 2)),
            ("user", Group.USER, randint(0, 3)),
            ("image", Group.VISUAL, randint(3, 10)),
            ("user", Group.USER, randint(2, 6)),
            ("template", Group.OTHER, randint(1, 2)),
        ]
        parts = [p for p in parts if (b, p[0]) not in drop]
        used = sum(n for _, _, n in parts)
        pad = randint(0, (length - used) // 3)
        n_response = 0 if (b, "response") in drop else length - used - pad
        parts.append(("response", Group.OTHER, n_response))
        pos = pad if bool(torch.rand(1, generator=gen) < 0.5) else 0  # left or right padding
        for name, group, n in parts:
            groups[b, pos : pos + n] = group
            if name == "response":
                response[b, pos : pos + n] = True
            pos += n
    return Layout(groups, groups == Group.USER, groups == Group.VISUAL, groups == Group.SYSTEM, response)


@dataclasses.dataclass
class Problem:
    layout: Layout
    layers: list  # per layer: dict of q [B, L, H, D], k, v [B, L, Hkv, D], bias [H, 4]
    maps: list  # per layer: float64 [B, H, L, L], built here from q, k and the groups
    fused: list  # per layer: float32 [B, H, L, 4] from avar_ops.attention
    exact: list  # per layer: float64 [B, H, L, 4] from avar_ops.attention_reference


def attention_map(q, k, key_group, bias, scale):
    """softmax(scale·q·kᵀ + bias[h, g(j)]) with causal and padding masks, float64 [B, H, L, L]."""
    B, L, H, _ = q.shape
    q64 = q.to(torch.float64).transpose(1, 2)  # [B, H, L, D]
    k64 = k.to(torch.float64).transpose(1, 2).repeat_interleave(H // k.shape[2], dim=1)  # [B, H, L, D]
    g = key_group.long()  # [B, L]
    key_bias = bias.to(torch.float64)[:, g.clamp(min=0)].permute(1, 0, 2)  # [B, H, L]
    scores = scale * q64 @ k64.transpose(-1, -2) + key_bias[:, :, None, :]  # [B, H, L, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # [L, L]
    visible = causal[None, None] & (g >= 0)[:, None, None, :]  # [B, 1, L, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    alive = visible.any(-1, keepdim=True)  # [B, 1, L, 1]; left padding leaves rows that see nothing
    probs = torch.softmax(torch.where(alive, scores, torch.zeros_like(scores)), dim=-1)
    return torch.where(alive, probs, torch.zeros_like(probs))


def make_problem(seed=0, batch=3, length=48, layers=3, heads=4, kv_heads=2, head_dim=16, drop=()) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    layout = make_layout(batch, length, gen, drop)
    scale = head_dim**-0.5
    params, maps, fused, exact = [], [], [], []
    for _ in range(layers):
        p = dict(
            q=torch.randn(batch, length, heads, head_dim, generator=gen),
            k=torch.randn(batch, length, kv_heads, head_dim, generator=gen),
            v=torch.randn(batch, length, kv_heads, head_dim, generator=gen),
            bias=torch.randn(heads, avar_ops.NUM_GROUPS, generator=gen),
        )
        params.append(p)
        maps.append(attention_map(p["q"], p["k"], layout.key_group, p["bias"], scale))
        fused.append(avar_ops.attention(p["q"], p["k"], p["v"], layout.key_group, p["bias"], return_mass=True).mass)
        exact.append(
            avar_ops.attention_reference(p["q"], p["k"], p["v"], layout.key_group, p["bias"], return_mass=True).mass
        )
    return Problem(layout, params, maps, fused, exact)


# ------------------------------------------------------------------------------- hand-written map versions


def map_vas(maps, query, image, system):
    """Per valid sample, from the maps: the arrays visual[l, h, i] and system[l, h, i] over its query tokens."""
    per_sample = {}
    for b in range(query.shape[0]):
        q_idx = torch.nonzero(query[b]).flatten()
        if len(q_idx) == 0:
            continue
        vis = torch.stack([m[b][:, q_idx][:, :, image[b]].sum(-1) for m in maps])  # [NL, H, nQ]
        sys = torch.stack([m[b][:, q_idx][:, :, system[b]].sum(-1) for m in maps])  # [NL, H, nQ]
        if bool((sys == 0).any()):
            continue
        per_sample[b] = (vis, sys)
    return per_sample


def map_vas_stats(maps, query, image, system):
    """{statistic: (overall, per_layer, per_layer_head, per_sample dict)} as the paper's Eq. 1 reads."""
    stats = {}
    for name, reduce in (
        ("vas", lambda v, s, dims: (v / s).mean(dims) if dims else (v / s).mean()),
        ("ratio_of_sums", lambda v, s, dims: v.sum(dims) / s.sum(dims) if dims else v.sum() / s.sum()),
        ("image_mass", lambda v, s, dims: v.mean(dims) if dims else v.mean()),
    ):
        samples = map_vas(maps, query, image, system)
        per_sample = {b: reduce(v, s, None) for b, (v, s) in samples.items()}
        per_layer = torch.stack([reduce(v, s, (1, 2)) for v, s in samples.values()]).mean(0)  # [NL]
        per_layer_head = torch.stack([reduce(v, s, (2,)) for v, s in samples.values()]).mean(0)  # [NL, H]
        overall = torch.stack(list(per_sample.values())).mean()
        stats[name] = (overall, per_layer, per_layer_head, per_sample)
    return stats


def map_agto(maps, query, image, system, eps):
    """(L_enhance_img, L_suppress_sys) (docs/design.md, "The method") from the maps, with explicit sums over
    (q, k) pairs."""
    enhance, suppress = [], []
    for b in range(query.shape[0]):
        Q, K_img, K_sys = query[b], image[b], system[b]
        if not (Q.any() and K_img.any() and K_sys.any()):
            continue
        enh_layers, sup_layers = [], []
        for m in maps:
            enh_heads, sup_heads = [], []
            for h in range(m.shape[1]):
                A = m[b, h]  # [L, L]
                img_pairs = A[Q][:, K_img].sum() / (Q.sum() * K_img.sum())
                sys_pairs = A[Q][:, K_sys].sum() / (Q.sum() * K_sys.sum())
                enh_heads.append(-torch.log(img_pairs + eps))
                sup_heads.append(torch.log(sys_pairs + eps))
            enh_layers.append(torch.stack(enh_heads).mean())
            sup_layers.append(torch.stack(sup_heads).mean())
        enhance.append(torch.stack(enh_layers).mean())
        suppress.append(torch.stack(sup_layers).mean())
    return torch.stack(enhance).mean(), torch.stack(suppress).mean()


def map_reward(maps, response, image, system, eps):
    """r_visual per sequence from head-averaged maps: mean over response tokens of the mean over layers."""
    rewards = []
    for b in range(response.shape[0]):
        per_token = []
        for t in torch.nonzero(response[b]).flatten():
            per_layer = []
            for m in maps:
                A = m[b].mean(0)  # [L, L], heads averaged inside the layer
                per_layer.append(A[t, image[b]].sum() / (A[t, system[b]].sum() + eps))
            per_token.append(torch.stack(per_layer).mean())
        rewards.append(torch.stack(per_token).mean() if per_token else torch.zeros((), dtype=torch.float64))
    return torch.stack(rewards)  # [B]


# ------------------------------------------------------------------------------------------------ helpers


def assert_exact(got: torch.Tensor, want: torch.Tensor):
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=FP64_REDUCTION_REL, atol=0.0)


def propagated_bound(fn, exact_masses):
    """Per output entry, how far fn(masses) can move when every mass entry moves by ≤ FP32_MASS_ABS (first
    order: Σ |∂out/∂mass|·FP32_MASS_ABS), plus the rounding of a float32 result."""
    leaves = [m.detach().clone().requires_grad_(True) for m in exact_masses]
    out = fn(leaves).reshape(-1)
    bounds = []
    for e in range(out.numel()):
        grads = torch.autograd.grad(out[e], leaves, retain_graph=True, allow_unused=True)
        l1 = sum(g.abs().sum() for g in grads if g is not None)
        bounds.append(l1 * FP32_MASS_ABS + out[e].detach().abs() * F32_EPS)
    return torch.stack(bounds)


def assert_within_propagated(fn, fused, exact, want):
    """fn on the fused float32 masses is as close to the map value as the masses' own tolerance allows."""
    assert max(max_abs_err(f, e) for f, e in zip(fused, exact)) <= FP32_MASS_ABS
    got = fn(fused).detach().to(torch.float64).reshape(-1)
    bound = propagated_bound(fn, exact)
    err = (got - want.reshape(-1)).abs()
    assert bool((err <= bound).all()), f"error {err.tolist()} exceeds the propagated bound {bound.tolist()}"
    assert bool(torch.isfinite(got).all())


# ------------------------------------------------------------------------------------------- map agreement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vas_matches_maps(seed):
    pb = make_problem(seed)
    lay = pb.layout
    want = map_vas_stats(pb.maps, lay.query, lay.image, lay.system)
    res = vas(pb.exact, lay.query)
    assert bool(res.valid.all())
    for name in ("vas", "ratio_of_sums", "image_mass"):
        red = getattr(res, name)
        overall, per_layer, per_layer_head, per_sample = want[name]
        assert_exact(red.overall, overall)
        assert_exact(red.per_layer, per_layer)
        assert_exact(red.per_layer_head, per_layer_head)
        assert_exact(red.per_sample, torch.stack([per_sample[b] for b in range(len(per_sample))]))

    # Same numbers from the fused masses, to the accuracy the masses carry; a stacked tensor works too.
    for name in ("vas", "ratio_of_sums", "image_mass"):
        overall, per_layer, per_layer_head, per_sample = want[name]
        flat = torch.cat(
            [
                overall[None],
                per_layer,
                per_layer_head.flatten(),
                torch.stack([per_sample[b] for b in range(len(per_sample))]),
            ]
        )

        def stats(masses, name=name):
            red = getattr(vas(masses, lay.query), name)
            return torch.cat([red.overall[None], red.per_layer, red.per_layer_head.flatten(), red.per_sample])

        assert_within_propagated(stats, pb.fused, pb.exact, flat)
    stacked = vas(torch.stack(pb.fused), lay.query)
    assert_exact(stacked.vas.per_layer_head, vas(pb.fused, lay.query).vas.per_layer_head)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agto_matches_maps(seed):
    pb = make_problem(seed)
    lay = pb.layout
    eps = 1e-6
    enh, sup = map_agto(pb.maps, lay.query, lay.image, lay.system, eps)
    got = agto_losses(pb.exact, lay.query, lay.image, lay.system, eps)
    assert_exact(got[0], enh)
    assert_exact(got[1], sup)
    assert bool(got.included.all())

    def both(masses):
        e, s = agto_losses(masses, lay.query, lay.image, lay.system, eps)
        return torch.stack([e, s])

    assert_within_propagated(both, pb.fused, pb.exact, torch.stack([enh, sup]))
    assert got.enhance_img is got[0] and got.suppress_sys is got[1]
    assert agto_losses(pb.fused, lay.query, lay.image, lay.system)[0].dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_visual_reward_matches_maps(seed):
    pb = make_problem(seed)
    lay = pb.layout
    eps = 1e-6
    want = map_reward(pb.maps, lay.response, lay.image, lay.system, eps)
    assert_exact(visual_reward(pb.exact, lay.response, eps), want)
    assert_within_propagated(lambda m: visual_reward(m, lay.response, eps), pb.fused, pb.exact, want)
    assert visual_reward(pb.fused, lay.response).shape == (lay.response.shape[0],)


# ----------------------------------------------------------------------------------------------- empty sets


def subset(masses, keep):
    return [m[keep] for m in masses]


def test_vas_sample_without_query_tokens():
    pb = make_problem(3, drop={(1, "user")})
    lay = pb.layout
    assert not bool(lay.query[1].any())
    with pytest.raises(ValueError, match=r"samples \[1\] have no query token.*empty='skip'"):
        vas(pb.fused, lay.query)
    res = vas(pb.fused, lay.query, empty="skip")
    assert res.valid.tolist() == [True, False, True]
    keep = torch.tensor([0, 2])
    alone = vas(subset(pb.fused, keep), lay.query[keep])
    for name in ("vas", "ratio_of_sums", "image_mass"):
        red, ref = getattr(res, name), getattr(alone, name)
        assert_exact(red.overall, ref.overall)
        assert_exact(red.per_layer_head, ref.per_layer_head)
        assert red.per_sample[1].item() == 0.0
        assert_exact(red.per_sample[keep], ref.per_sample)
        assert all(bool(torch.isfinite(t).all()) for t in red)


def test_vas_zero_system_mass():
    pb = make_problem(4, drop={(0, "system")})
    lay = pb.layout
    with pytest.raises(ValueError, match=r"samples \[0\] have a query token with zero system mass"):
        vas(pb.fused, lay.query)
    res = vas(pb.fused, lay.query, empty="skip")
    assert res.valid.tolist() == [False, True, True]
    assert all(bool(torch.isfinite(t).all()) for red in (res.vas, res.ratio_of_sums, res.image_mass) for t in red)
    # With eps > 0 every term is defined: the sample is valid and its ratio is image mass / eps.
    eps = 1e-3
    res_eps = vas(pb.fused, lay.query, eps=eps)
    assert bool(res_eps.valid.all())
    assert 0 not in map_vas(pb.maps, lay.query, lay.image, lay.system)  # the map version has no ratio for it
    vis0 = torch.stack([m[0][:, lay.query[0]][:, :, lay.image[0]].sum(-1) for m in pb.maps])  # [NL, H, nQ]
    assert_exact(vas(pb.exact, lay.query, eps=eps).vas.per_sample[0], (vis0 / eps).mean())
    with pytest.raises(ValueError, match="no sample has"):
        vas(subset(pb.fused, torch.tensor([0])), lay.query[:1], empty="skip")


@pytest.mark.parametrize("part", ["image", "system", "user"])
def test_agto_empty_sets(part):
    pb = make_problem(5, drop={(2, part)})
    lay = pb.layout
    what = {"image": "image", "system": "system", "user": "query"}[part]
    with pytest.raises(ValueError, match=rf"samples \[2\] have no {what} token"):
        agto_losses(pb.fused, lay.query, lay.image, lay.system)
    got = agto_losses(pb.fused, lay.query, lay.image, lay.system, empty="skip")
    assert got.included.tolist() == [True, True, False]
    keep = torch.tensor([0, 1])
    alone = agto_losses(subset(pb.fused, keep), lay.query[keep], lay.image[keep], lay.system[keep])
    assert_exact(got[0], alone[0])
    assert_exact(got[1], alone[1])
    assert bool(torch.isfinite(got[0])) and bool(torch.isfinite(got[1]))


def test_agto_nothing_included_is_zero_and_backpropagates():
    pb = make_problem(6, batch=2, drop={(0, "image"), (1, "system")})
    lay = pb.layout
    leaves = [m.detach().clone().requires_grad_(True) for m in pb.fused]
    got = agto_losses(leaves, lay.query, lay.image, lay.system, empty="skip")
    assert got.included.tolist() == [False, False]
    assert got[0].item() == 0.0 and got[1].item() == 0.0
    (got[0] + got[1]).backward()
    assert all(bool((m.grad == 0).all()) for m in leaves)


def test_visual_reward_empty_response():
    pb = make_problem(7, drop={(1, "response")})
    lay = pb.layout
    with pytest.raises(ValueError, match=r"samples \[1\] have no response token.*empty='zero'"):
        visual_reward(pb.fused, lay.response)
    got = visual_reward(pb.fused, lay.response, empty="zero")
    assert got[1].item() == 0.0
    keep = torch.tensor([0, 2])
    assert_exact(got[keep], visual_reward(subset(pb.fused, keep), lay.response[keep]))
    assert bool(torch.isfinite(got).all())


# ------------------------------------------------------------------------------------------------ bad input


def _bad_calls():
    pb = make_problem(8, batch=2, length=32, layers=2)
    lay = pb.layout
    m = pb.fused
    q, img, sys, resp = lay.query, lay.image, lay.system, lay.response
    nan_mass = [m[0].clone(), m[1]]
    nan_mass[0][0, 0, 5, 1] = float("nan")
    neg_mass = [m[0].clone(), m[1]]
    neg_mass[0][1, 1, 3, 2] = -0.5
    return [
        (lambda: vas([], q), ValueError, "at least one layer"),
        (lambda: vas("masses", q), TypeError, "must be a list"),
        (lambda: vas([m[0][..., :3], m[1][..., :3]], q), ValueError, r"\[B, H, L, 4\], got shape"),
        (lambda: vas(m[0], q), ValueError, r"\[NL, B, H, L, 4\], got shape \(2, 4, 32, 4\)"),
        (lambda: vas([m[0], m[1][:, :2]], q), ValueError, "layer 1 has"),
        (lambda: vas([m[0], m[1].double()], q), TypeError, "layer 1 has torch.float64"),
        (lambda: vas([m[0], m[1].to(torch.device("meta"))], q), ValueError, "layer 1 is on meta"),
        (lambda: vas([m[0].long()], q), TypeError, "floating-point"),
        (lambda: vas([m[0], 3], q), TypeError, r"masses\[1\] must be a torch.Tensor"),
        (lambda: vas(nan_mass, q), ValueError, "finite, non-negative"),
        (lambda: vas(neg_mass, q), ValueError, "1 visual/system entries"),
        (lambda: vas(m, q.float()), TypeError, "query_mask must have dtype torch.bool, got torch.float32"),
        (lambda: vas(m, q[:, :-1]), ValueError, r"query_mask must have shape \(2, 32\).*got \(2, 31\)"),
        (lambda: vas(m, q.tolist()), TypeError, "query_mask must be a bool torch.Tensor"),
        (lambda: vas(m, q.to("meta")), ValueError, "query_mask must be on cpu"),
        (lambda: vas(m, q, eps=-1.0), ValueError, "eps must be a finite float >= 0"),
        (lambda: vas(m, q, eps=float("nan")), ValueError, "eps must be"),
        (lambda: vas(m, q, eps=True), TypeError, "eps must be a float, got bool"),
        (lambda: vas(m, q, empty="zero"), ValueError, "empty must be one of"),
        (lambda: agto_losses(m, q, img, sys, eps=0.0), ValueError, "eps must be a finite float > 0"),
        (lambda: agto_losses(m, q, img[:1], sys), ValueError, r"image_mask must have shape \(2, Lk\)"),
        (lambda: agto_losses(m, q, img, sys[:, :-2]), ValueError, r"system_mask must have shape \(2, 32\)"),
        (lambda: agto_losses(m, q, img.int(), sys), TypeError, "image_mask must have dtype torch.bool"),
        (lambda: agto_losses(m, q[None], img, sys), ValueError, "query_mask must have shape"),
        (lambda: agto_losses(m, q, img, sys, empty="zero"), ValueError, "empty must be one of"),
        (lambda: visual_reward(m, resp, eps=0.0), ValueError, "eps must be a finite float > 0"),
        (lambda: visual_reward(m, resp[:, 1:]), ValueError, "response_mask must have shape"),
        (lambda: visual_reward(m, resp, empty="skip"), ValueError, "empty must be one of"),
        (lambda: visual_reward({"a": 1}, resp), TypeError, "masses_per_layer must be a list"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input(index):
    call, exc, message = _bad_calls()[index]
    with pytest.raises(exc, match=message):
        call()


# ------------------------------------------------------------------------------------------------- gradients


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(9)
    lay = make_layout(2, 32, gen)
    # Masses that sum to 1 over groups, as attention gives; leaves for gradcheck.
    masses = [
        torch.softmax(torch.randn(2, 3, 32, 4, generator=gen, dtype=torch.float64), -1).requires_grad_(True)
        for _ in range(2)
    ]
    assert torch.autograd.gradcheck(lambda *ms: agto_losses(list(ms), lay.query, lay.image, lay.system)[0], masses)
    assert torch.autograd.gradcheck(lambda *ms: agto_losses(list(ms), lay.query, lay.image, lay.system)[1], masses)
    assert torch.autograd.gradcheck(lambda *ms: vas(list(ms), lay.query).vas.per_layer_head, masses)
    assert torch.autograd.gradcheck(lambda *ms: visual_reward(list(ms), lay.response), masses)


def test_gradients_flow_into_fused_masses():
    pb = make_problem(10)
    lay = pb.layout
    leaves = [m.detach().clone().requires_grad_(True) for m in pb.fused]
    enh, sup = agto_losses(leaves, lay.query, lay.image, lay.system)
    (0.15 * enh + 0.15 * sup).backward()
    for m in leaves:
        assert bool(torch.isfinite(m.grad).all())
        # Only query rows of the visual and system channels enter the losses.
        rows = lay.query[:, None, :].expand(-1, m.shape[1], -1)  # [B, H, L]
        assert bool((m.grad[..., avar_ops.Group.VISUAL][rows] < 0).all())  # more image mass lowers L_enhance
        assert bool((m.grad[..., avar_ops.Group.SYSTEM][rows] > 0).all())  # less system mass lowers L_suppress
        assert bool((m.grad[..., avar_ops.Group.VISUAL][~rows] == 0).all())
        assert bool((m.grad[..., [avar_ops.Group.OTHER, avar_ops.Group.USER]] == 0).all())


def _adam_on_bias(attention_fn, bias_dtype, steps=8):
    """Adam on a learnable [H, 4] bias table shared by the layers, minimising L_enhance_img.
    Returns (losses per step, image mass before, image mass after)."""
    pb = make_problem(11, layers=2)
    lay = pb.layout
    heads = pb.layers[0]["q"].shape[2]
    bias = torch.zeros(heads, avar_ops.NUM_GROUPS, dtype=bias_dtype, requires_grad=True)
    opt = torch.optim.Adam([bias], lr=0.1)
    losses, image_mass = [], []
    for _ in range(steps):
        masses = [attention_fn(p["q"], p["k"], p["v"], lay.key_group, bias, return_mass=True).mass for p in pb.layers]
        enh, _ = agto_losses(masses, lay.query, lay.image, lay.system)
        image_mass.append(vas([m.detach() for m in masses], lay.query).image_mass.overall.item())
        losses.append(enh.item())
        opt.zero_grad()
        enh.backward()
        assert bool(torch.isfinite(bias.grad).all())
        opt.step()
    return losses, image_mass


def test_adam_lowers_enhance_loss_through_reference_attention():
    losses, image_mass = _adam_on_bias(avar_ops.attention_reference, torch.float64)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert image_mass[-1] > image_mass[0], image_mass


def test_adam_lowers_enhance_loss_through_fused_attention():
    losses, image_mass = _adam_on_bias(avar_ops.attention, torch.float32)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert image_mass[-1] > image_mass[0], image_mass
