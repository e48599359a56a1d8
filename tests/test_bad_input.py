"""Every misuse of avar_ops.attention raises an exception that names the argument, the expectation and what
arrived: one test per class of mistake."""

import math

import pytest
import torch

import avar_ops


def _qkv(B=2, L=8, H=4, Hkv=2, D=64, dtype=torch.float32):
    return (
        torch.randn(B, L, H, D, dtype=dtype),
        torch.randn(B, L, Hkv, D, dtype=dtype),
        torch.randn(B, L, Hkv, D, dtype=dtype),
    )


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_wrong_rank():
    q, k, v = _qkv()
    _raises(ValueError, r"q must be \[B, L, H, D\].*got shape \[2, 8, 256\]", avar_ops.attention, q.flatten(2), k, v)


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
    _raises(
        TypeError, r"key_group must be int8, got Long", avar_ops.attention, q, k, v, torch.zeros(2, 8, dtype=torch.long)
    )


def test_key_group_wrong_shape():
    q, k, v = _qkv()
    _raises(
        ValueError,
        r"key_group must be \[B, Lk\] = \[2, 8\], got shape \[2, 7\]",
        avar_ops.attention,
        q,
        k,
        v,
        torch.zeros(2, 7, dtype=torch.int8),
    )


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
    _raises(
        ValueError,
        rf"{name} must be \[H, G\] = \[4, 4\] or \[G\] = \[4\], got shape \[3\]",
        avar_ops.attention,
        q,
        k,
        v,
        **{name: torch.zeros(3)},
    )


@pytest.mark.parametrize("name", ["bias", "logit_scale"])
def test_group_table_dtype(name):
    q, k, v = _qkv()
    _raises(
        TypeError,
        rf"{name} must be float32, got Double",
        avar_ops.attention,
        q,
        k,
        v,
        **{name: torch.zeros(4, dtype=torch.float64)},
    )


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
    _raises(
        TypeError,
        r"cu_seqlens_q must be int32, got Long",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu.int(),
    )


def test_cu_seqlens_not_monotone():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"cu_seqlens_k must be non-decreasing, got 6 then 5",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 5], dtype=torch.int32),
    )


def test_cu_seqlens_past_tensor():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"cu_seqlens_q\[-1\] = 11 is past the 10 rows of q",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor([0, 4, 11], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32),
    )


def test_cu_seqlens_must_start_at_zero():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"cu_seqlens_q\[0\] must be 0, got 1",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32),
    )


def test_cu_seqlens_given_alone():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"must be given together.*only cu_seqlens_q",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32),
    )


def test_max_seqlen_too_small():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"max_seqlen_q = 3 is smaller than the longest query sequence",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32),
        max_seqlen_q=3,
    )


def test_varlen_key_group_shape():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"key_group must be \[Tk\] = \[12\]",
        avar_ops.attention,
        q,
        k,
        v,
        torch.zeros(2, 6, dtype=torch.int8),
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32),
    )


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


# ----------------------------------------------------------------------------------------------------------
# Values that are finite in Python but overflow float32, where the kernels compute.


@pytest.mark.parametrize("scale", [1e39, 3e38])
def test_scale_overflows_float32(scale):
    q, k, v = _qkv()
    _raises(ValueError, r"scale = .* overflows float32", avar_ops.attention, q, k, v, scale=scale)


def test_table_built_from_a_float_that_overflows_float32():
    q, k, v = _qkv()
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1e39, 1.0]] * 2)  # 1e39 becomes inf in float32
    _raises(
        ValueError,
        r"logit_scale must be finite in float32, got inf at logit_scale\[1, 2\]$",
        avar_ops.attention,
        q,
        k,
        v,
        logit_scale=t,
    )


@pytest.mark.parametrize("name", ["bias", "logit_scale"])
def test_table_overflows_in_the_log2_domain(name):
    q, k, v = _qkv()
    t = torch.ones(4)
    t[3] = 3e38
    _raises(
        ValueError, rf"{name}\[3\] = 3e\+38.* overflows float32", avar_ops.attention, q, k, v, scale=1.0, **{name: t}
    )


def test_scale_times_logit_scale_overflows():
    q, k, v = _qkv()
    _raises(
        ValueError,
        r"logit_scale\[0, 0\] = 1e\+20 times scale = .* overflows float32",
        avar_ops.attention,
        q,
        k,
        v,
        scale=1e20,
        logit_scale=torch.full((4, 4), 1e20),
    )


@pytest.mark.parametrize("name", ["bias", "logit_scale"])
def test_non_finite_table_message_is_one_line(name):
    q, k, v = _qkv()
    t = torch.ones(4, 4)
    t[2, 1] = math.nan
    with pytest.raises(ValueError) as info:
        avar_ops.attention(q, k, v, **{name: t})
    msg = str(info.value)
    assert f"{name} must be finite in float32, got nan at {name}[2, 1]" in msg
    assert "\n" not in msg.strip() and "tensor(" not in msg


# ----------------------------------------------------------------------------------------------------------
# Zero sizes, D = 0 and wrong Python types.


@pytest.mark.parametrize("B,L,H,Hkv", [(0, 8, 4, 2), (2, 0, 4, 2), (2, 8, 0, 1)], ids=["B0", "L0", "H0"])
@pytest.mark.parametrize("return_mass", [False, True])
def test_backward_of_zero_size_inputs_gives_empty_gradients(B, L, H, Hkv, return_mass):
    q = torch.randn(B, L, H, 64, requires_grad=True)
    k = torch.randn(B, L, Hkv, 64, requires_grad=True)
    v = torch.randn(B, L, Hkv, 64, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    res = avar_ops.attention(q, k, v, bias=bias, return_mass=return_mass)
    loss = res.out.sum() + (res.mass.sum() if return_mass else 0)
    loss.backward()
    for t in (q, k, v, bias):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_head_dim_zero():
    q, k, v = _qkv(D=0)
    _raises(ValueError, r"head dim 0 is not supported on the CPU", avar_ops.attention, q, k, v)
    lse = torch.zeros(2, 4, 8)
    _raises(
        ValueError, r"head dim 0 is not supported on the CPU", avar_ops.attention_key_mass, q, k, lse, torch.ones(2, 8)
    )


@pytest.mark.parametrize("name", ["q", "k", "v", "key_group", "bias", "logit_scale"])
def test_list_instead_of_tensor(name):
    q, k, v = _qkv()
    kw = dict(q=q, k=k, v=v)
    kw[name] = [[0.0] * 4] * 4
    kind = "a torch.Tensor or None" if name in ("key_group", "bias", "logit_scale") else "a torch.Tensor"
    _raises(TypeError, rf"^avar.attention: {name} must be {kind}, got list$", avar_ops.attention, **kw)


@pytest.mark.parametrize("name", ["lse", "query_weight"])
def test_key_mass_list_instead_of_tensor(name):
    q, k, _ = _qkv()
    kw = dict(q=q, k=k, lse=torch.zeros(2, 4, 8), query_weight=torch.ones(2, 8))
    kw[name] = [0.0]
    _raises(
        TypeError,
        rf"^avar.attention_key_mass: {name} must be a torch.Tensor, got list$",
        avar_ops.attention_key_mass,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------------
# Where the value checks run: always on the CPU; on CUDA only behind the switch.


def test_cpu_value_checks_ignore_the_switch():
    q, k, v = _qkv()
    kg = torch.zeros(2, 8, dtype=torch.int8)
    kg[0, 0] = 7
    was = avar_ops.input_checks()
    avar_ops.set_input_checks(False)
    try:
        _raises(ValueError, r"key_group values must be in -1..3", avar_ops.attention, q, k, v, kg)
        _raises(ValueError, r"bias must be finite", avar_ops.attention, q, k, v, bias=torch.full((4,), math.inf))
    finally:
        avar_ops.set_input_checks(was)


def test_set_input_checks_wants_a_bool():
    _raises(TypeError, r"on must be a bool, got int", avar_ops.set_input_checks, 1)


def test_max_seqlen_more_than_rows():
    q, k, v = _varlen()
    _raises(
        ValueError,
        r"max_seqlen_k = 13 is more than the 12 rows of k",
        avar_ops.attention,
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32),
        max_seqlen_q=6,
        max_seqlen_k=13,
    )


@pytest.mark.skipif(avar_ops.core.load_extension().with_cuda, reason="this build has CUDA kernels")
@pytest.mark.parametrize("op", ["attention_fwd", "attention_bwd", "attention_key_mass"])
def test_cpu_only_build_explains_cuda_tensors(op):
    """The CUDA key of a CPU-only build answers with how to rebuild, not the dispatcher's generic error.

    No GPU is needed: the CUDA kernel is reached by redispatching CPU tensors to the CUDA key.
    """
    q, k, v = _qkv()
    lse = torch.zeros(2, 4, 8)
    args = {
        "attention_fwd": (q, k, v, None, None, None, 0.125, True, None, None, -1, -1, False),
        "attention_bwd": (
            q,
            None,
            None,
            q,
            k,
            v,
            q,
            lse,
            None,
            None,
            None,
            None,
            0.125,
            True,
            None,
            None,
            -1,
            -1,
            False,
            False,
        ),
        "attention_key_mass": (q, k, lse, torch.ones(2, 8), None, None, None, 0.125, True, None, None, -1, -1),
    }[op]
    overload = getattr(torch.ops.avar, op).default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=r"has no CUDA kernels.*AVAR_CUDA_ARCHS"):
        overload.redispatch(keys, *args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_varlen_needs_max_seqlen():
    q = torch.randn(10, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(12, 2, 64, device="cuda", dtype=torch.bfloat16)
    _raises(
        ValueError,
        r"varlen on CUDA needs max_seqlen_q and max_seqlen_k",
        avar_ops.attention,
        q,
        k,
        k,
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda"),
        cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32, device="cuda"),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_value_checks_run_under_the_switch():
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv())
    kg = torch.zeros(2, 8, dtype=torch.int8, device="cuda")
    kg[0, 0] = 7
    assert avar_ops.input_checks(), "the tests run with the input checks on (conftest)"
    _raises(ValueError, r"key_group values must be in -1..3", avar_ops.attention, q, k, v, kg)
