"""The problem every benchmark times, and the PyTorch baselines that compute the same thing.

A Qwen2.5-VL-7B text layer (H = 28, H_kv = 4, D = 128) over a multimodal prompt: system prompt, image tokens,
user text, answer, with the intervention's bias (log(1 + 0.15) on image keys, log(1 − 0.2) on system keys), so
every path computes a non-trivial score modification.
"""

from __future__ import annotations

import argparse
import math
import re

import torch
import torch.nn.functional as F

from avar_ops import NUM_GROUPS

HEADS, KV_HEADS, DIM = 28, 4, 128
# Bias per group (other text, visual, system, user text).
GROUP_BIAS = (0.0, math.log(1.15), math.log(0.8), 0.0)


def key_groups(batch: int, len_k: int, device="cpu") -> torch.Tensor:
    """Group ids of a chat prompt: BOS, system prompt, two template tokens, image, one token, user text, answer."""
    kg = torch.zeros(batch, len_k, dtype=torch.int8, device=device)  # [B, Lk]
    sys_end, img_end = len_k // 16, len_k // 16 + len_k // 2
    kg[:, 1:sys_end] = 2
    kg[:, sys_end + 2 : img_end] = 1
    kg[:, img_end + 1 : img_end + len_k // 8] = 3
    return kg


def make_problem(
    L: int,
    dtype: torch.dtype,
    H: int = HEADS,
    Hkv: int = KV_HEADS,
    D: int = DIM,
    B: int = 1,
    seed: int = 0,
    len_q: int | None = None,
):
    """q, k, v, key groups and the [H, G] bias table on the CPU; len_q < L gives the decode shape (the last
    len_q queries of a causal prompt of L keys)."""
    len_q = L if len_q is None else len_q
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, len_q, H, D, generator=gen).to(dtype)  # [B, Lq, H, D]
    k = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)  # [B, L, Hkv, D]
    v = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)  # [B, L, Hkv, D]
    bias = torch.tensor(GROUP_BIAS).expand(H, NUM_GROUPS).contiguous()  # [H, G]
    return q, k, v, key_groups(B, L), bias


def additive_mask(kg: torch.Tensor, bias: torch.Tensor, L: int, dtype) -> torch.Tensor:
    """The float mask [B, H, L, L] equal to our bias lookup with causality folded in."""
    per_key = bias[:, kg.long().clamp(min=0)].permute(1, 0, 2)  # [B, H, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # [L, L]
    mask = per_key[:, :, None, :].expand(-1, -1, L, -1).masked_fill(~causal, float("-inf"))
    return mask.to(dtype).contiguous()  # [B, H, L, L]


def to_bhld(q, k, v, H):
    """SDPA layout with kv heads expanded (outside the timed region) so PyTorch's flash kernel takes it."""
    rep = H // k.shape[2]
    return (
        q.transpose(1, 2).contiguous(),  # [B, H, L, D]
        k.transpose(1, 2).repeat_interleave(rep, 1).contiguous(),  # [B, H, L, D]
        v.transpose(1, 2).repeat_interleave(rep, 1).contiguous(),  # [B, H, L, D]
    )


def eager_with_maps(qh, kh, vh, mask, group_onehot):
    s = (qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5 + mask  # [B, H, L, L]
    p = torch.softmax(s, dim=-1)
    return p @ vh, p @ group_onehot  # out [B, H, L, D], masses [B, H, L, G]


def group_onehot(kg: torch.Tensor, dtype) -> torch.Tensor:
    return F.one_hot(kg.long().clamp(min=0), NUM_GROUPS).to(dtype)[:, None]  # [B, 1, L, G]


def flex_callable(kg, bias):
    """FlexAttention, compiled, with the equivalent score_mod and a causal BlockMask (CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = kg.shape[1]
    groups = kg[0].long().clamp(min=0)  # [L]
    table = bias.clone()  # [H, G]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, groups[kv_idx]]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda qh, kh, vh: compiled(qh, kh, vh, score_mod=score_mod, block_mask=block_mask)


def cpu_arg_parser(doc: str, methods, report_name: str) -> argparse.ArgumentParser:
    """The flags both CPU benchmarks take; parse with parse_cpu_args so --quick applies."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=methods, choices=methods)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no report: checks that everything runs")
    ap.add_argument("--name", default=report_name, help="report file name under benchmarks/results")
    return ap


def parse_cpu_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if any(L <= 0 for L in args.lengths + args.memory_lengths):
        ap.error(f"--lengths and --memory-lengths must be positive, got {args.lengths} and {args.memory_lengths}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", args.name):
        ap.error(f"--name must be a plain file name (letters, digits, _ . -), got {args.name!r}")
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.quick:
        args.lengths, args.repeat, args.memory_lengths = [256], 1, [256]
    args.dtypes = [getattr(torch, d) for d in args.dtypes]
    return args
