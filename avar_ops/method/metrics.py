"""AVAR's attention statistics over per-group attention masses: VAS, the AGTO losses and the VARS visual reward.

Everything here is plain PyTorch over the masses that `avar_ops.attention(..., return_mass=True)` returns,
float32 [B, H, L, G] per layer (G = 4 groups: 0 other text, 1 visual, 2 system, 3 user text). The sums over
keys the published method takes from L×L attention maps are already in them: Σ_{k∈K_img} A_qk is
mass[q, visual] and Σ_{k∈K_sys} A_qk is mass[q, system], so nothing here needs a map.

`masses` arguments take either a list with one [B, H, L, G] tensor per layer or one stacked [NL, B, H, L, G]
tensor; all layers must share shape, dtype and device. The token masks are bool [B, L] over the same query
positions as the masses; the key masks of `agto_losses` describe the keys that were given group 1 (visual)
and group 2 (system) when the masses were computed: only their counts per sample enter the losses.

Arithmetic is float64 inside (the masses are small next to the model that produced them), results come back
in the masses' dtype (VAS in float64: it is a measurement, not a training signal).

Empty sets. A sample without query tokens, image tokens or system tokens has no defined VAS / AGTO term, and
a query whose system mass is 0 has no defined VAS ratio when eps = 0. Each function takes
`empty="error"` (the default: a ValueError that names the samples and the reason) or an explicit opt-out
(`"skip"` for VAS and AGTO, `"zero"` for the reward) whose effect is stated in the function's docstring and
flagged in what it returns. No path returns NaN or inf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from avar_ops.core import NUM_GROUPS, Group

__all__ = [
    "Reduction",
    "VASResult",
    "AGTOLosses",
    "VISUAL_REWARDS",
    "vas",
    "agto_losses",
    "visual_reward",
    "visual_token_ratios",
]

Masses = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---------------------------------------------------------------------------------------------------- checks


def _group_channels(fn: str, arg: str, masses: Masses):
    """Validate `masses` and return its visual and system channels, each float64 [NL, B, H, L]."""
    if isinstance(masses, torch.Tensor):
        if masses.dim() != 5 or masses.shape[-1] != NUM_GROUPS:
            raise ValueError(
                f"{fn}: {arg} given as one tensor must be [NL, B, H, L, {NUM_GROUPS}], got shape {tuple(masses.shape)}"
            )
        layers = list(masses.unbind(0))
        if not layers:
            raise ValueError(f"{fn}: {arg} must hold at least one layer, got shape {tuple(masses.shape)}")
    elif isinstance(masses, (list, tuple)):
        layers = list(masses)
        if not layers:
            raise ValueError(f"{fn}: {arg} must hold at least one layer, got an empty {type(masses).__name__}")
    else:
        raise TypeError(
            f"{fn}: {arg} must be a list of [B, H, L, {NUM_GROUPS}] tensors (one per layer) or a "
            f"[NL, B, H, L, {NUM_GROUPS}] tensor, got {type(masses).__name__}"
        )
    first = layers[0]
    for i, m in enumerate(layers):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{fn}: {arg}[{i}] must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() != 4 or m.shape[-1] != NUM_GROUPS:
            raise ValueError(f"{fn}: {arg}[{i}] must be [B, H, L, {NUM_GROUPS}], got shape {tuple(m.shape)}")
        if not m.is_floating_point():
            raise TypeError(f"{fn}: {arg}[{i}] must be a floating-point tensor, got dtype {m.dtype}")
        if m.shape != first.shape:
            raise ValueError(
                f"{fn}: every layer of {arg} must have the shape of layer 0, {tuple(first.shape)}; "
                f"layer {i} has {tuple(m.shape)}"
            )
        if m.dtype != first.dtype:
            raise TypeError(
                f"{fn}: every layer of {arg} must have dtype {first.dtype} (layer 0); layer {i} has {m.dtype}"
            )
        if m.device != first.device:
            raise ValueError(
                f"{fn}: every layer of {arg} must be on {first.device} (layer 0); layer {i} is on {m.device} "
                f"(move the masses to one device first)"
            )
    if first.shape[1] == 0:
        # A mean over no head is 0/0; refuse it rather than return NaN.
        raise ValueError(f"{fn}: {arg} must have at least one head, got shape {tuple(first.shape)} (H = 0)")
    visual = torch.stack([m[..., Group.VISUAL] for m in layers]).to(torch.float64)  # [NL, B, H, L]
    system = torch.stack([m[..., Group.SYSTEM] for m in layers]).to(torch.float64)  # [NL, B, H, L]
    # Masses are attention probabilities; a negative or non-finite one would turn a log or ratio into NaN.
    bad = int((~(torch.isfinite(visual) & (visual >= 0))).sum() + (~(torch.isfinite(system) & (system >= 0))).sum())
    if bad:
        raise ValueError(
            f"{fn}: {arg} must hold finite, non-negative attention masses; {bad} visual/system entries are not"
        )
    return visual, system, first.dtype


def _check_mask(fn: str, arg: str, mask, batch: int, length, device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a bool torch.Tensor [B, L], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{fn}: {arg} must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 2 or mask.shape[0] != batch or (length is not None and mask.shape[1] != length):
        want = f"({batch}, {length})" if length is not None else f"({batch}, Lk)"
        raise ValueError(f"{fn}: {arg} must have shape {want} to match the masses, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{fn}: {arg} must be on {device} like the masses, got {mask.device}")
    return mask


def _check_eps(fn: str, eps, allow_zero: bool) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{fn}: eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0 or (eps == 0 and not allow_zero):
        want = "a finite float >= 0" if allow_zero else "a finite float > 0"
        raise ValueError(f"{fn}: eps must be {want}, got {eps!r}")
    return float(eps)


def _check_empty(fn: str, empty, allowed: tuple) -> str:
    if empty not in allowed:
        raise ValueError(f"{fn}: empty must be one of {allowed}, got {empty!r}")
    return empty


def _raise_for_missing(fn: str, reasons: dict, opt_out: str) -> None:
    """reasons maps a description to a bool [B] tensor of the samples it applies to."""
    parts = []
    for what, flags in reasons.items():
        samples = torch.nonzero(flags).flatten().tolist()
        if samples:
            parts.append(f"samples {samples} {what}")
    if parts:
        raise ValueError(f"{fn}: " + "; ".join(parts) + f" (pass empty={opt_out!r} to exclude them)")


# ------------------------------------------------------------------------------------------------------- VAS


class Reduction(NamedTuple):
    """One statistic at every resolution, each a mean over the valid samples of that sample's value."""

    overall: torch.Tensor  # []
    per_layer: torch.Tensor  # [NL]
    per_layer_head: torch.Tensor  # [NL, H]
    per_sample: torch.Tensor  # [B]; 0 for samples that are not valid


@dataclasses.dataclass(frozen=True)
class VASResult:
    vas: Reduction  # the paper's Eq. 1: mean over layers, heads and query tokens of visual / system mass
    ratio_of_sums: Reduction  # Σ visual mass / Σ system mass over the same terms
    image_mass: Reduction  # mean visual mass over the same terms (the absolute image share)
    valid: torch.Tensor  # bool [B]: the samples that entered every mean
    eps: float


def vas(masses: Masses, query_mask: torch.Tensor, *, eps: float = 0.0, empty: str = "error") -> VASResult:
    """Visual Attention Score (AVAR Eq. 1) and its two companions, from per-layer attention masses.

    For layer l, head h and query token i (query_mask, the user-turn tokens):
        VAS_i(l, h) = mass_i[visual] / (mass_i[system] + eps)
    and per sample
        vas            = mean over l, h, i of VAS_i(l, h)            (a mean of ratios, as the paper)
        ratio_of_sums  = Σ_{l,h,i} mass_i[visual] / (Σ_{l,h,i} mass_i[system] + eps)
        image_mass     = mean over l, h, i of mass_i[visual]
    per_layer / per_layer_head restrict l (and h) and keep the other means; for ratio_of_sums the sums run
    over the terms that are kept. Every batch-level number is the equal-weight mean over the valid samples
    of that sample's number, so a batch gives what evaluating its samples one by one and averaging gives,
    whatever their prompt lengths or padding.

    eps: the paper divides by the system mass itself, which is what the default eps = 0 does. A query whose
    system mass is exactly 0 (no system token in its sample, or all of them masked or causally hidden) then
    has no ratio, and its sample is not valid. eps > 0 divides by (system + eps) everywhere instead, which
    defines every term (large where the system mass is tiny) and lowers each ratio by a factor
    system / (system + eps), negligible when eps is far below the system masses.

    empty: "error" raises a ValueError naming the samples that have no query token or (eps = 0) a query with
    zero system mass. "skip" leaves them out of every mean, sets their per_sample entries to 0 and their
    `valid` flag to False; a batch with no valid sample still raises (there is nothing to average).

    Args:
        masses: list of [B, H, L, 4] tensors (one per layer) or [NL, B, H, L, 4].
        query_mask: bool [B, L], the query tokens to average over.
    """
    fn = "vas"
    eps = _check_eps(fn, eps, allow_zero=True)
    empty = _check_empty(fn, empty, ("error", "skip"))
    visual, system, _ = _group_channels(fn, "masses", masses)  # [NL, B, H, L] each
    NL, B, H, L = visual.shape
    query_mask = _check_mask(fn, "query_mask", query_mask, B, L, visual.device)

    qw = query_mask.to(torch.float64)  # [B, L]
    n_query = qw.sum(-1)  # [B]
    denom = system + eps  # [NL, B, H, L]
    undefined = (denom <= 0) & query_mask[None, :, None, :]  # [NL, B, H, L]
    no_query = n_query == 0  # [B]
    zero_system = undefined.any(dim=(0, 2, 3))  # [B]
    valid = ~no_query & ~zero_system  # [B]
    if empty == "error":
        _raise_for_missing(
            fn,
            {
                "have no query token (query_mask is all False)": no_query,
                "have a query token with zero system mass (undefined ratio at eps = 0)": zero_system,
            },
            "skip",
        )
    if not bool(valid.any()):
        raise ValueError(f"{fn}: no sample has both a query token and a defined ratio; nothing to average")

    # Undefined terms get denominator 1 so that neither the value nor its gradient sees 0/0; their samples
    # carry weight 0 below.
    ratio = visual / torch.where(denom > 0, denom, torch.ones_like(denom))  # [NL, B, H, L]
    n_query_safe = torch.where(valid, n_query, torch.ones_like(n_query))  # [B]
    ratio_mean = (ratio * qw[None, :, None]).sum(-1) / n_query_safe[None, :, None]  # [NL, B, H]
    visual_sum = (visual * qw[None, :, None]).sum(-1)  # [NL, B, H]
    system_sum = (system * qw[None, :, None]).sum(-1)  # [NL, B, H]
    visual_mean = visual_sum / n_query_safe[None, :, None]  # [NL, B, H]

    sample_w = valid.to(torch.float64) / valid.sum()  # [B]

    def over_samples(x):  # [B], [NL, B] or [NL, B, H] -> the mean over the valid samples
        shape = (B,) if x.dim() == 1 else (1, B) + (1,) * (x.dim() - 2)
        weighted = torch.where(valid.view(shape), x, torch.zeros_like(x)) * sample_w.view(shape)
        return weighted.sum(0 if x.dim() == 1 else 1)

    def ratio_of(num, den):  # den > 0 wherever the sample is valid (every term's system mass is > 0 or eps > 0)
        den = den + eps
        return num / torch.where(den > 0, den, torch.ones_like(den))

    def reduction(per_lbh, per_lb, per_b) -> Reduction:  # [NL, B, H], [NL, B], [B]
        per_sample = torch.where(valid, per_b, torch.zeros_like(per_b))
        return Reduction(
            overall=over_samples(per_b),
            per_layer=over_samples(per_lb),
            per_layer_head=over_samples(per_lbh),
            per_sample=per_sample,
        )

    vas_red = reduction(ratio_mean, ratio_mean.mean(-1), ratio_mean.mean(dim=(0, 2)))
    ros_red = reduction(
        ratio_of(visual_sum, system_sum),
        ratio_of(visual_sum.sum(-1), system_sum.sum(-1)),
        ratio_of(visual_sum.sum(dim=(0, 2)), system_sum.sum(dim=(0, 2))),
    )
    img_red = reduction(visual_mean, visual_mean.mean(-1), visual_mean.mean(dim=(0, 2)))
    return VASResult(vas=vas_red, ratio_of_sums=ros_red, image_mass=img_red, valid=valid, eps=eps)


# ------------------------------------------------------------------------------------------------------ AGTO


class AGTOLosses(tuple):
    """(L_enhance_img, L_suppress_sys), unpacking as the pair, plus `included`: bool [B], the samples that
    entered the batch mean."""

    def __new__(cls, enhance_img: torch.Tensor, suppress_sys: torch.Tensor, included: torch.Tensor):
        self = super().__new__(cls, (enhance_img, suppress_sys))
        self.included = included
        return self

    @property
    def enhance_img(self) -> torch.Tensor:
        return self[0]

    @property
    def suppress_sys(self) -> torch.Tensor:
        return self[1]


def agto_losses(
    masses_per_layer: Masses,
    query_mask: torch.Tensor,
    image_mask: torch.Tensor,
    system_mask: torch.Tensor,
    eps: float = 1e-6,
    *,
    empty: str = "error",
) -> AGTOLosses:
    """AGTO's attention losses (docs/design.md, "The method"), differentiable in the masses.

    Per sample, with Q = query_mask, K_img = image_mask, K_sys = system_mask:
        L_enhance_img = −mean_{l,h} log( Σ_{q∈Q} mass_q[visual] / (|Q|·|K_img|) + eps )
        L_suppress_sys = +mean_{l,h} log( Σ_{q∈Q} mass_q[system] / (|Q|·|K_sys|) + eps )
    i.e. the log of the mean attention per (query, key) pair, averaged over heads then layers (every layer has
    the same head count, so that is the mean over (l, h)), then the mean over the samples of the batch.
    The training objective is L_LM + α·L_enhance_img + β·L_suppress_sys (α = β = 0.15 in the paper).

    image_mask / system_mask are bool [B, Lk] over the keys: the keys given group 1 / group 2 when the masses
    were computed. Only their counts per sample are used (the masses already hold the sums over them).

    empty: a sample with no query, image or system token has no term. "error" (default) raises a ValueError
    naming those samples. "skip" leaves them out of the batch mean and reports them in `.included`; when no
    sample is left both losses are 0, still attached to the graph (backward gives zero gradients).

    Returns AGTOLosses: unpacks as (L_enhance_img, L_suppress_sys), scalars in the masses' dtype, and carries
    `.included` bool [B].
    """
    fn = "agto_losses"
    eps = _check_eps(fn, eps, allow_zero=False)
    empty = _check_empty(fn, empty, ("error", "skip"))
    visual, system, dtype = _group_channels(fn, "masses_per_layer", masses_per_layer)  # [NL, B, H, L] each
    NL, B, H, L = visual.shape
    device = visual.device
    query_mask = _check_mask(fn, "query_mask", query_mask, B, L, device)
    image_mask = _check_mask(fn, "image_mask", image_mask, B, None, device)
    system_mask = _check_mask(fn, "system_mask", system_mask, B, image_mask.shape[1], device)

    qw = query_mask.to(torch.float64)  # [B, L]
    n_query = qw.sum(-1)  # [B]
    n_image = image_mask.sum(-1).to(torch.float64)  # [B]
    n_system = system_mask.sum(-1).to(torch.float64)  # [B]
    included = (n_query > 0) & (n_image > 0) & (n_system > 0)  # [B]
    if empty == "error":
        _raise_for_missing(
            fn,
            {
                "have no query token": n_query == 0,
                "have no image token": n_image == 0,
                "have no system token": n_system == 0,
            },
            "skip",
        )

    def mean_log_pair_attention(group_mass, n_keys):  # [NL, B, H], [B] -> [B]
        pairs = torch.where(included, n_query * n_keys, torch.ones_like(n_query))  # [B]
        per_pair = group_mass / pairs[None, :, None]  # [NL, B, H]
        return torch.log(per_pair + eps).mean(dim=(0, 2))  # [B]

    visual_q = (visual * qw[None, :, None]).sum(-1)  # [NL, B, H]
    system_q = (system * qw[None, :, None]).sum(-1)  # [NL, B, H]
    enhance = -mean_log_pair_attention(visual_q, n_image)  # [B]
    suppress = mean_log_pair_attention(system_q, n_system)  # [B]

    n_included = int(included.sum())
    if n_included == 0:
        zero = (visual.sum() * 0.0).to(dtype)
        return AGTOLosses(zero, zero.clone(), included)
    w = included.to(torch.float64) / n_included  # [B]
    enhance = (torch.where(included, enhance, torch.zeros_like(enhance)) * w).sum()
    suppress = (torch.where(included, suppress, torch.zeros_like(suppress)) * w).sum()
    return AGTOLosses(enhance.to(dtype), suppress.to(dtype), included)


# ---------------------------------------------------------------------------------------------------- reward


VISUAL_REWARDS = ("ratio", "capped_ratio", "ratio_of_sums", "image_mass")


def visual_reward(
    masses_per_layer: Masses,
    response_mask: torch.Tensor,
    eps: float = 1e-6,
    *,
    empty: str = "error",
    kind: str = "ratio",
    cap: Optional[float] = None,
) -> torch.Tensor:
    """VARS's visual reward r_visual, one number per sequence: float [B] in the masses' dtype, float32 for
    float16 / bfloat16 masses.

    With m_g(l, t) the mass of response token t on group g averaged over the heads of layer l (heads are
    averaged inside a layer before the ratio, as an attention map averaged over heads would give):

        "ratio" (the paper's Eq. 5, the default):
            mean_t mean_l  m_vis(l, t) / (m_sys(l, t) + eps)
        "capped_ratio": the same with every term capped,
            mean_t mean_l  min(m_vis(l, t) / (m_sys(l, t) + eps), cap)
        "ratio_of_sums":
            Σ_{t,l} m_vis(l, t) / (Σ_{t,l} m_sys(l, t) + eps)
        "image_mass": the absolute image share,
            mean_t mean_l  m_vis(l, t)

    Why the alternatives: a response token's system mass can be close to 0 (late tokens attend to the recent
    text), and its one term m_vis / (m_sys + eps) then outweighs every other token's, so the mean of ratios
    follows single tokens. A cap bounds each term; the ratio of sums weighs tokens by their system mass, so a
    token with almost none adds almost nothing; the image mass has no denominator at all (bounded by 1).

    This is the raw term. The paper's reward is 0 for a wrong answer; that gating on correctness, λ_v and the
    GRPO group normalisation belong to the trainer, which knows the answers.

    empty: a sequence with no response token has no reward. "error" (default) raises a ValueError naming it;
    "zero" returns 0 for it, the flag being `~response_mask.any(-1)` (the caller's own mask).

    Range: with "ratio", a token with no system mass has ratio m_vis / eps (up to 1e6 with the default eps),
    beyond float16's largest value (65504); the reward therefore comes back in float32 at least. A reward
    beyond float32's range (only reachable with eps below ~1e-38) saturates at the largest float32 instead of
    becoming inf.

    Args:
        masses_per_layer: list of [B, H, L, 4] tensors (one per layer) or [NL, B, H, L, 4].
        response_mask: bool [B, L], the generated tokens.
        kind: one of VISUAL_REWARDS. cap: the per-term cap of "capped_ratio" (a finite number > 0), required
            there and refused with the other kinds.
    """
    fn = "visual_reward"
    eps = _check_eps(fn, eps, allow_zero=False)
    empty = _check_empty(fn, empty, ("error", "zero"))
    cap = _check_kind(fn, kind, cap)
    visual, system, dtype = _group_channels(fn, "masses_per_layer", masses_per_layer)  # [NL, B, H, L] each
    NL, B, H, L = visual.shape
    response_mask = _check_mask(fn, "response_mask", response_mask, B, L, visual.device)

    rw = response_mask.to(torch.float64)  # [B, L]
    n_response = rw.sum(-1)  # [B]
    has_response = n_response > 0  # [B]
    if empty == "error":
        _raise_for_missing(fn, {"have no response token": ~has_response}, "zero")

    vis, sys_ = visual.mean(2), system.mean(2)  # [NL, B, L] each
    safe_n = torch.where(has_response, n_response, torch.ones_like(n_response))  # [B]
    if kind in ("ratio", "capped_ratio"):
        ratio = vis / (sys_ + eps)  # [NL, B, L]
        if cap is not None:
            ratio = ratio.clamp(max=cap)
        reward = (ratio.mean(0) * rw).sum(-1) / safe_n  # [B]
    elif kind == "ratio_of_sums":
        reward = (vis * rw).sum(dim=(0, 2)) / ((sys_ * rw).sum(dim=(0, 2)) + eps)  # [B]
    else:
        reward = (vis.mean(0) * rw).sum(-1) / safe_n  # [B]
    reward = torch.where(has_response, reward, torch.zeros_like(reward))  # [B]
    out_dtype = torch.promote_types(dtype, torch.float32)
    top = torch.finfo(out_dtype).max
    return reward.clamp(max=top).to(out_dtype)


def visual_token_ratios(masses_per_layer: Masses, response_mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The per-token terms of Eq. 5, mean_l m_vis(l, t) / (m_sys(l, t) + eps), of every response token of the
    batch: float64 [T] (T = response_mask.sum()), in batch-major token order. Their spread (e.g. p50 / p90 /
    max) shows whether a few tokens with almost no system mass decide the "ratio" reward."""
    fn = "visual_token_ratios"
    eps = _check_eps(fn, eps, allow_zero=False)
    visual, system, _ = _group_channels(fn, "masses_per_layer", masses_per_layer)  # [NL, B, H, L] each
    NL, B, H, L = visual.shape
    response_mask = _check_mask(fn, "response_mask", response_mask, B, L, visual.device)
    per_token = (visual.mean(2) / (system.mean(2) + eps)).mean(0)  # [B, L]
    return per_token[response_mask]  # [T]


def _check_kind(fn: str, kind, cap) -> Optional[float]:
    if kind not in VISUAL_REWARDS:
        raise ValueError(f"{fn}: kind must be one of {VISUAL_REWARDS}, got {kind!r}")
    if kind == "capped_ratio":
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"{fn}: kind 'capped_ratio' needs cap, a finite number > 0, got {cap!r}")
        return float(cap)
    if cap is not None:
        raise ValueError(f"{fn}: cap is only used with kind 'capped_ratio', got cap={cap!r} with kind {kind!r}")
    return None
