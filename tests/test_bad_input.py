"""Every misuse of avar_ops.attention raises an exception that names the argument, the expectation and what
arrived: one test per class of mistake."""

import math

import pytest
import torch

import avar_ops


def _qkv(B=2, L=8, H=4, Hkv=2, D=64, dtype=torch.float32):
    return (torch.randn(B, L, H, D, dtype=dtype), torch.randn(B, L, Hkv, D, dtype=dtype),
            torch.randn(B, L, Hkv, D, dtype=dtype))


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_wrong_rank():
    q, k, v = _qkv()
    _raises(ValueError, r"q must be \[B, L, H, D\].*got shape \[2, 8, 256\]", avar_ops.attention,
            q.flatten(2), k, v)


def test_dtype_mismatch():
    q, k, v = _qkv()
    _raises(TypeError, r"q, k and v must share one dtype.*k BFloat16", avar_ops.attention, q, k.bfloat16(), v)


def test_unsupported_dtype_on_cpu():
    q, k, v = _qkv(dtype=torch.float16)
    _raises(TypeError, r"q dtype Half is not supported on cpu", avar_ops.attention, q, k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    q, k, v = _qkv(dtype=torch.bfloat16)
    _raises(ValueError, r"k must be on the same device as q", avar_ops.attention, q, k.cuda(), v)


def test_meta_device_mismatch_is_reported():
    """A meta tensor routes the call to the fake kernel, which must still refuse a device mix-up."""
    q, k, v = _qkv()
    _raises(ValueError, r"k must be on the same device as q \(cpu\), got meta", avar_ops.attention, q, k.to("meta"), v)


def test_heads_not_multiple_of_kv_heads():
    q, k, v = _qkv(H=6, Hkv=4)
    _raises(ValueError, r"H % H_kv == 0.*H = 6 and H_kv = 4", avar_ops.attention, q, k, v)


def test_head_dim_unsupported():
    q, k, v = _qkv(D=300)
    _raises(ValueError, r"head dim 300 is not supported on the CPU", avar_ops.attention, q, k, v)


def test_head_dim_mismatch():
    q, k, v = _qkv()
    _raises(ValueError, r"same head dim", avar_ops.attention, q, k[..., :32].contiguous(), v[..., :32].contiguous())


def test_last_dim_not_contiguous():
    q, k, v = _qkv()
    q_bad = torch.randn(2, 8, 4, 128)[..., ::2]
    _raises(ValueError, r"q must have a contiguous last dimension.*strides", avar_ops.attention, q_bad, k, v)


def test_kv_shape_mismatch():
    q, k, v = _qkv()
    _raises(ValueError, r"k and v must have the same shape", avar_ops.attention, q, k, v[:, :5])


def test_key_group_not_int8():
    q, k, v = _qkv()
    _raises(TypeError, r"key_group must be int8, got Long", avar_ops.attention, q, k, v,
            torch.zeros(2, 8, dtype=torch.long))


def test_key_group_wrong_shape():
    q, k, v = _qkv()
    _raises(ValueError, r"key_group must be \[B, Lk\] = \[2, 8\], got shape \[2, 7\]", avar_ops.attention, q, k, v,
            torch.zeros(2, 7, dtype=torch.int8))


def test_key_group_out_of_range():
    q, k, v = _qkv()
    kg = torch.zeros(2, 8, dtype=torch.int8)
    kg[1, 3] = 4
    _raises(ValueError, r"key_group values must be in -1..3.*got values in 0..4", avar_ops.attention, q, k, v, kg)
    kg[1, 3] = -2
    _raises(ValueError, r"got values in -2..0", avar_ops.attention, q, k, v, kg)


@pytest.mark.parametrize("name", ["bias", "logit_scale"])
def test_group_table_shape(name):
    q, k, v = _qkv()
    _raises(ValueError, rf"{name} must be \[H, G\] = \[4, 4\] or \[G\] = \[4\], got shape \[3\]",
            avar_ops.attention, q, k, v, **{name: torch.zeros(3)})


@pytest.mark.parametrize("name", ["bias", "logit_scale"])
def test_group_table_dtype(name):
    q, k, v = _qkv()
    _raises(TypeError, rf"{name} must be float32, got Double", avar_ops.attention, q, k, v,
            **{name: torch.zeros(4, dtype=torch.float64)})


@pytest.mark.parametrize("name", ["bias", "logit_scale"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_group_table_not_finite(name, bad):
    q, k, v = _qkv()
    t = torch.ones(4, 4)
    t[2, 1] = bad
    _raises(ValueError, rf"{name} must be finite", avar_ops.attention, q, k, v, **{name: t})


def _varlen():
    q = torch.randn(10, 4, 64)
    k = torch.randn(12, 2, 64)
    return q, k, k.clone()


def test_cu_seqlens_not_int32():
    q, k, v = _varlen()
    cu = torch.tensor([0, 4, 10], dtype=torch.int64)
    _raises(TypeError, r"cu_seqlens_q must be int32, got Long", avar_ops.attention, q, k, v,
            cu_seqlens_q=cu, cu_seqlens_k=cu.int())


def test_cu_seqlens_not_monotone():
    q, k, v = _varlen()
    _raises(ValueError, r"cu_seqlens_k must be non-decreasing, got 6 then 5", avar_ops.attention, q, k, v,
            cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 6, 5], dtype=torch.int32))


def test_cu_seqlens_past_tensor():
    q, k, v = _varlen()
    _raises(ValueError, r"cu_seqlens_q\[-1\] = 11 is past the 10 rows of q", avar_ops.attention, q, k, v,
            cu_seqlens_q=torch.tensor([0, 4, 11], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32))


def test_cu_seqlens_must_start_at_zero():
    q, k, v = _varlen()
    _raises(ValueError, r"cu_seqlens_q\[0\] must be 0, got 1", avar_ops.attention, q, k, v,
            cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32))


def test_cu_seqlens_given_alone():
    q, k, v = _varlen()
    _raises(ValueError, r"must be given together.*only cu_seqlens_q", avar_ops.attention, q, k, v,
            cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32))


def test_max_seqlen_too_small():
    q, k, v = _varlen()
    _raises(ValueError, r"max_seqlen_q = 3 is smaller than the longest query sequence", avar_ops.attention, q, k, v,
            cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32), max_seqlen_q=3)


def test_varlen_key_group_shape():
    q, k, v = _varlen()
    _raises(ValueError, r"key_group must be \[Tk\] = \[12\]", avar_ops.attention, q, k, v,
            torch.zeros(2, 6, dtype=torch.int8),
            cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32))


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_scale_not_finite(scale):
    q, k, v = _qkv()
    _raises(ValueError, r"scale must be finite", avar_ops.attention, q, k, v, scale=scale)


def test_scale_not_a_number():
    q, k, v = _qkv()
    _raises(TypeError, r"scale must be a float or None, got str", avar_ops.attention, q, k, v, scale="0.1")


def test_direct_op_call_is_checked_too():
    """The C++ checks guard the kernels even when the Python wrapper is bypassed."""
    q, k, v = _qkv()
    kg = torch.full((2, 8), 9, dtype=torch.int8)
    with pytest.raises(ValueError, match="key_group values must be in -1..3"):
        torch.ops.avar.attention_fwd(q, k, v, kg, None, None, 0.125, True, None, None, 0, 0, True)
