"""pytest-benchmark cases for the CPU forward (run on demand: `pytest benchmarks/test_bench_attention.py`).

The script bench_attention.py is the one that writes the committed report; these cases make it easy to compare
two builds with pytest-benchmark's own storage (`--benchmark-autosave`, `--benchmark-compare`).
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import avar_ops  # noqa: E402
from common import additive_mask, make_problem, to_bhld  # noqa: E402

LENGTHS = [512, 1024]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", LENGTHS)
def test_avar_forward(benchmark, L, dtype):
    q, k, v, kg, bias = make_problem(L, dtype)
    res = benchmark(lambda: avar_ops.attention(q, k, v, kg, bias, return_mass=True))
    assert torch.isfinite(res.mass).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", LENGTHS)
def test_sdpa_causal(benchmark, L, dtype):
    q, k, v, _, _ = make_problem(L, dtype)
    qh, kh, vh = to_bhld(q, k, v, q.shape[2])
    benchmark(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", LENGTHS)
def test_sdpa_additive_mask(benchmark, L, dtype):
    q, k, v, kg, bias = make_problem(L, dtype)
    qh, kh, vh = to_bhld(q, k, v, q.shape[2])
    mask = additive_mask(kg, bias, L, dtype)
    benchmark(lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask))
