"""The GPU check's smoke test: one forward and backward of the CUDA kernels on a 7B-shaped GQA problem (bf16,
D = 128, 28 query heads on 4 kv heads, 1024 tokens, masked keys), against the float64 reference with the test
suite's tolerances. Exits non-zero, with the errors, when the kernels do not launch or disagree.
"""

import sys

import torch

import avar_ops
from avar_ops.core import attention_reference
from avar_ops.core.testing import LOWP_FWD_FACTOR, LOWP_GRAD_FACTOR, lowp_bound, rel_err, torch_lowp_attention


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU")
        return 1
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    B, L, H, Hkv, D = 1, 1024, 28, 4, 128
    q = torch.randn(B, L, H, D, device=dev, generator=gen).to(dtype).requires_grad_(True)  # [B, L, H, D]
    k = torch.randn(B, L, Hkv, D, device=dev, generator=gen).to(dtype).requires_grad_(True)  # [B, L, Hkv, D]
    v = torch.randn(B, L, Hkv, D, device=dev, generator=gen).to(dtype).requires_grad_(True)
    kg = torch.randint(-1, 4, (B, L), device=dev, generator=gen).to(torch.int8)  # [B, L]
    bias = torch.randn(H, 4, device=dev, generator=gen)  # [H, G]

    res = avar_ops.attention(q, k, v, kg, bias, causal=True, return_mass=True)
    d_out = torch.randn(res.out.shape, device=dev, generator=gen).to(dtype)  # like out
    grads = torch.autograd.grad((res.out.float() * d_out.float()).sum(), (q, k, v))

    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*leaves, kg, bias.double(), causal=True, return_mass=True)
    ref_grads = torch.autograd.grad((ref.out * d_out.double()).sum(), leaves)
    # PyTorch's own bf16 attention on the same inputs: the error scale the tolerances are multiples of.
    t_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    t_out, _ = torch_lowp_attention(*t_leaves, kg, bias, causal=True)
    t_grads = torch.autograd.grad((t_out.float() * d_out.float()).sum(), t_leaves)

    failures = []
    bound = lowp_bound(rel_err(t_out, ref.out), dtype, LOWP_FWD_FACTOR)
    err = rel_err(res.out, ref.out)
    print(f"out: rel error {err:.3g} (bound {bound:.3g})")
    if not err <= bound:
        failures.append("out")
    for name, g, r, t in zip("qkv", grads, ref_grads, t_grads):
        gbound = lowp_bound(rel_err(t, r), dtype, LOWP_GRAD_FACTOR)
        gerr = rel_err(g, r)
        print(f"d{name}: rel error {gerr:.3g} (bound {gbound:.3g})")
        if not (torch.isfinite(g).all() and gerr <= gbound):
            failures.append(f"d{name}")
    print("smoke test passed" if not failures else f"smoke test FAILED: {', '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
