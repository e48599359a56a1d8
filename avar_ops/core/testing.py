"""Test support shared by tests/ and benchmarks/: the one place for tolerances, error measures, output
poisoning, and PyTorch's own low-precision attention (the yardstick for bf16/fp16 tolerances).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from avar_ops.core.constants import NUM_GROUPS
from avar_ops.core.extension import load_extension

# fp32 kernels against the float64 reference.
FP32_OUT_REL = 1e-5  # relative (Frobenius) error of out and of gradients
FP32_MASS_ABS = 1e-5  # absolute error of every mass entry
FP32_LSE_ABS = 1e-5 * 4  # lse is ~log(L) + max logit; absolute, scaled for |lse| up to ~10

# Whole-model fp32 parity (tests/test_patch.py): logits of the tiny Qwen2.5-VL (3 layers, hidden 128, L < 100)
# when its attention is computed by two different fp32 kernels. Each kernel rounds at the fp32 unit roundoff
# (6e-8) with reduction lengths ≤ 128, so one attention differs by ~1e-6 relative and three layers compound
# that to a few 1e-6; PyTorch's own eager and SDPA paths differ by ~8e-7 on this model. 1e-5 leaves that
# margin, while any semantic slip (one padding key visible, a wrong group, a bias of 0.01) moves the logits
# by 1e-3 relative or more.
FP32_MODEL_REL = 1e-5

# Whole-model fp32 gradients (tests/test_train_through_patch.py): the gradient of the AGTO objective with
# respect to a projection weight of the tiny model, with attention and masses from the fused op versus from
# eager maps. The backward runs the same three layers in reverse with reductions no longer than in the forward
# (L < 100 keys, hidden 128, MLP 256), so it rounds like the forward above: a few 1e-6 relative (about 1.5e-6
# measured). The log(mass + eps) of AGTO adds no amplification of note since the masses on the user tokens are
# ≳ 1e-2, far above their fp32 rounding. A slip in the mass gradient (a dropped dmass·mass term in D, dmass
# routed to the wrong group) changes these gradients by O(1) relative, so 1e-5 separates the two by far.
FP32_MODEL_GRAD_REL = 1e-5

# Two float64 computations of the same reduction that differ only in summation order (the AVAR metrics from
# masses vs from full maps): each reduction of n ≤ 1e4 terms rounds by ≲ n·2.2e-16 ≈ 2e-12 relative, and the
# ratios and logs on top at most double that; 1e-10 leaves room while a wrong definition is off by O(1).
FP64_REDUCTION_REL = 1e-10

# fp64 kernels (gradcheck support): out is float64, exact up to summation-order rounding; mass and lse are
# always returned as float32, so they carry one float32 rounding (half an ulp of 1.0 bounds it for masses).
FP64_OUT_REL = 1e-12
FP32_OUTPUT_ROUNDING = 2.0**-24

# A bf16 decode step of the tiny model replayed from a CUDA graph against the same step run eagerly from an
# identical cache (tests/test_cuda.py): the same kernels on the same inputs, so equal unless a library picks
# another algorithm under capture (a GEMM split differently), which moves a bf16 activation by about one rounding
# (2^-8 relative) per layer. 2^-6 (logits relative, masses absolute) covers a few of those, while a replay that
# kept the groups, ids or cache of the capture moves the tiny model's logits by ~0.1 relative and its masses by
# ~0.3 (measured on the CPU in bf16).
BF16_REPLAY_ERR = 2.0**-6

# Low precision: our error may be at most this multiple of PyTorch's own error at the same precision
# (the project's rule: forward ≤ 2×, gradients ≤ 3×), plus a floor well below one ulp of the dtype at |x| ~ 1 so that
# a lucky PyTorch result that is exact to rounding cannot make a correct kernel fail.
LOWP_FWD_FACTOR = 2.0
LOWP_GRAD_FACTOR = 3.0
LOWP_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}

# lse of the low-precision GPU kernels: scores are exact products of the low-precision inputs accumulated in
# fp32 by the tensor cores, and l is summed in fp32 from fast exp2 (≤ 2 ulp), so lse carries fp32 error only
# (~1e-6 relative at |lse| ≲ 30, D ≤ 128, L ≤ a few thousand); no low-precision rounding enters it. The CPU
# kernels do the same: exact bf16 products summed in fp32, and l summed from the fp32 p before any rounding.
LOWP_LSE_ABS = 1e-4

# float64 gradcheck of the ops. out is float64 for float64 inputs, so its numerical Jacobian is exact enough for
# gradcheck's defaults. lse and mass are float32 whatever the input dtype: each evaluation rounds them by up to
# 2^-24·|y| (|lse| ≲ 8 on the gradcheck shapes, so ≲ 5e-7), and a central difference divides two such
# roundings by 2·eps, giving ≲ 5e-4 at eps = 1e-3 (the truncation error, ~eps²·|f‴|/6, is ~1e-6 there).
# The bias and logit_scale tables are float32 too: a float64 perturbation of them is rounded by ≲ 2^-24·|x|,
# which changes the effective eps by ≲ 1e-4 relative at eps = 1e-3, well inside gradcheck's rtol of 1e-3.
# An atol of twice that still catches any wrong term, which moves these O(1) derivatives by O(0.1) or more.
GRADCHECK_F32_OUTPUT_EPS = 1e-3
GRADCHECK_F32_OUTPUT_ATOL = 1e-3


# The fp32 bounds above hold for scores of ordinary size. A score is rounded in proportion to the magnitude of
# its terms, scale·|γ|·Σ_d |q_d·k_d| + |β|, and every output error inherits that absolute error of the scores
# (out and masses through p's relative error, lse directly). Random normal inputs give magnitudes up to ~20 at
# the head dims of the tests; inputs with huge entries (the fuzz test's 1e4) give ~1e3 and more, and the bounds
# are widened by the ratio.
FP32_SCORE_MAGNITUDE = 20.0


def score_magnitude_factor(magnitude: float) -> float:
    """How much wider than the ordinary fp32 bounds the errors may be for scores of this magnitude (≥ 1)."""
    return max(1.0, magnitude / FP32_SCORE_MAGNITUDE)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    x64, r64 = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    den = r64.norm().item()
    num = (x64 - r64).norm().item()
    return num / den if den > 0 else num


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs().max().item() if x.numel() else 0.0


def lowp_bound(torch_err: float, dtype: torch.dtype, factor: float) -> float:
    return factor * torch_err + LOWP_FLOOR[dtype]


def lowp_table_bound(torch_abs_err: float, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Bound on the max abs error of a gradient table (dbias, dlogit_scale).

    Each entry is a sum of dS over many (query, key) pairs whose total can cancel to ~0 (Σ_j dS_ij = 0 for every
    row), so a relative measure is meaningless there: the floor is scaled by the table's magnitude (at least 1).
    """
    magnitude = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    return LOWP_GRAD_FACTOR * torch_abs_err + LOWP_FLOOR[dtype] * magnitude


@contextlib.contextmanager
def poisoned_outputs():
    """Inside this context every output buffer of the avar ops starts as NaN."""
    ext = load_extension()
    ext.set_poison_outputs(True)
    try:
        yield
    finally:
        ext.set_poison_outputs(False)


def _torch_lowp_probs(q, k, key_group, bias, logit_scale, scale, causal):
    """P [B, H, Lq, Lk] in q's dtype from plain PyTorch ops, and the clamped group ids [B, Lk]."""
    dt = q.dtype
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qh = q.transpose(1, 2)  # [B, H, Lq, D]
    kh = k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    groups = key_group.long() if key_group is not None else torch.zeros(B, Lk, dtype=torch.long, device=q.device)
    g_idx = groups.clamp(min=0)
    gam = torch.ones(H, NUM_GROUPS) if logit_scale is None else logit_scale.float().expand(H, NUM_GROUPS)
    bet = torch.zeros(H, NUM_GROUPS) if bias is None else bias.float().expand(H, NUM_GROUPS)
    gam = gam.to(q.device)[:, g_idx].permute(1, 0, 2).to(dt)  # [B, H, Lk]
    bet = bet.to(q.device)[:, g_idx].permute(1, 0, 2).to(dt)  # [B, H, Lk]
    s = (qh @ kh.transpose(-1, -2)) * scale * gam[:, :, None] + bet[:, :, None]  # [B, H, Lq, Lk]
    visible = (groups >= 0)[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        visible = visible & (j <= i + (Lk - Lq))
    s = s.masked_fill(~visible, float("-inf"))
    # Dead rows (no visible key) give p = 0; a finite stand-in keeps softmax's backward free of NaN there.
    alive = visible.any(dim=-1, keepdim=True)  # [B, 1, Lq, 1]
    return torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1) * alive, groups


def torch_lowp_attention(
    q: torch.Tensor,  # [B, Lq, H, D] low precision
    k: torch.Tensor,  # [B, Lk, Hkv, D]
    v: torch.Tensor,  # [B, Lk, Hkv, D]
    key_group: Optional[torch.Tensor] = None,  # [B, Lk]
    bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
):
    """The same attention computed by plain PyTorch ops in q's dtype (eager maps, PyTorch's own rounding).

    Returns out [B, Lq, H, D] and mass [B, H, Lq, G] in q's dtype. This is the error yardstick: a fused
    kernel at bf16 should be at most a small multiple as far from the float64 reference as this is.
    """
    dt = q.dtype
    H, Hkv = q.shape[2], k.shape[2]
    p, groups = _torch_lowp_probs(q, k, key_group, bias, logit_scale, scale, causal)  # [B, H, Lq, Lk]
    vh = v.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # [B, H, Lk, D]
    onehot = torch.nn.functional.one_hot(groups.clamp(min=0), NUM_GROUPS).to(dt) * (groups >= 0)[..., None].to(dt)
    return (p @ vh).transpose(1, 2), p @ onehot[:, None]


def torch_lowp_key_mass(
    q: torch.Tensor,  # [B, Lq, H, D] low precision
    k: torch.Tensor,  # [B, Lk, Hkv, D]
    query_weight: torch.Tensor,  # [B, H, Lq] or [B, Lq]
    key_group: Optional[torch.Tensor] = None,  # [B, Lk]
    bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
) -> torch.Tensor:
    """Σ_i w_i·P_ij [B, H, Lk] with P from PyTorch's own low-precision softmax: the key-mass yardstick."""
    p, _ = _torch_lowp_probs(q, k, key_group, bias, logit_scale, scale, causal)  # [B, H, Lq, Lk]
    w = query_weight if query_weight.dim() == 3 else query_weight[:, None].expand(-1, q.shape[2], -1)
    return torch.einsum("bhi,bhij->bhj", w.to(q.dtype), p)
