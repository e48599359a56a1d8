"""Small forward and backward runs of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

Shapes are tiny (the sanitizer slows kernels down by orders of magnitude) but cover: partial tiles, GQA,
causal and not, masked keys, varlen with an empty sequence, the split-KV decode path, backward with mass and
table gradients, and key mass. Exits non-zero if any output is non-finite.
"""

import sys

import torch

import avar_ops


def run(B, Lq, Lk, H, Hkv, D, causal, dtype=torch.bfloat16, varlen=None):
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    if varlen is None:
        q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype, generator=gen)  # [B, Lq, H, D]
        k = torch.randn(B, Lk, Hkv, D, device=dev, dtype=dtype, generator=gen)  # [B, Lk, Hkv, D]
        v = torch.randn(B, Lk, Hkv, D, device=dev, dtype=dtype, generator=gen)
        kg = torch.randint(-1, 4, (B, Lk), device=dev, generator=gen).to(torch.int8)  # [B, Lk]
        extra = {}
    else:
        lens_q, lens_k = varlen
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        q = torch.randn(int(cu_q[-1]), H, D, device=dev, dtype=dtype, generator=gen)  # [Tq, H, D]
        k = torch.randn(int(cu_k[-1]), Hkv, D, device=dev, dtype=dtype, generator=gen)  # [Tk, Hkv, D]
        v = torch.randn(int(cu_k[-1]), Hkv, D, device=dev, dtype=dtype, generator=gen)
        kg = torch.randint(-1, 4, (int(cu_k[-1]),), device=dev, generator=gen).to(torch.int8)  # [Tk]
        extra = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    bias = torch.randn(H, 4, device=dev, generator=gen).requires_grad_(True)  # [H, G]
    gamma = (1 + 0.3 * torch.randn(H, 4, device=dev, generator=gen)).requires_grad_(True)  # [H, G]
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    res = avar_ops.attention(q, k, v, kg, bias, logit_scale=gamma, causal=causal, return_mass=True, **extra)
    loss = res.out.float().square().sum() + (res.mass * torch.arange(4, device=dev)).sum()
    grads = torch.autograd.grad(loss, (q, k, v, bias, gamma))
    w = torch.rand_like(res.lse)
    km = avar_ops.attention_key_mass(
        q.detach(), k.detach(), res.lse, w, kg, bias.detach(), logit_scale=gamma.detach(), causal=causal, **extra
    )
    torch.cuda.synchronize()
    outs = [res.out, res.mass, km, *grads]
    return all(bool(torch.isfinite(t).all()) for t in outs)


def main():
    ok = True
    ok &= run(2, 70, 70, 4, 2, 64, causal=True)
    ok &= run(1, 150, 150, 2, 1, 128, causal=False, dtype=torch.float16)
    ok &= run(1, 33, 90, 3, 3, 80, causal=True)
    ok &= run(1, 0, 0, 4, 2, 64, causal=True, varlen=([5, 0, 40], [9, 0, 40]))
    ok &= run(1, 2, 1100, 4, 1, 64, causal=True)  # split-KV decode
    print("all outputs finite" if ok else "NON-FINITE OUTPUT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
