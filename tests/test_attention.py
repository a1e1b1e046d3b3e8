"""meanflow.nn.attention: SDPA forward with chunked forward-mode and backward rules."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import assert_total_derivative_matches_fd, jvp_inputs, perturbed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from meanflow.errors import MeanFlowError
from meanflow.nn import attention as attention_module
from meanflow.nn import dit
from meanflow.nn.attention import (
    DEFAULT_CHUNK,
    attention,
    attention_jvp_backend,
    attention_jvp_choice,
)


def math_attention(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _qkv(n, b=2, h=3, d=8, dtype=torch.float64, seed=0, count=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(count))


# N below, equal to, and not divisible by the chunk (128)
SIZES = [5, DEFAULT_CHUNK, 2 * DEFAULT_CHUNK + 37]


@pytest.mark.parametrize("n", SIZES)
def test_forward_equals_math_backend(n):
    q, k, v = _qkv(n)
    assert torch.allclose(attention(q, k, v), math_attention(q, k, v), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("math_context", [False, True])
def test_func_jvp_equals_math_backend_jvp(n, math_context):
    q, k, v, dq, dk, dv = _qkv(n, count=6)
    for tangents in [(dq, dk, dv), (dq, 0 * dk, 0 * dv), (0 * dq, dk, 0 * dv),
                     (0 * dq, 0 * dk, dv)]:
        _, want = torch.func.jvp(math_attention, (q, k, v), tangents)
        if math_context:
            with sdpa_kernel(SDPBackend.MATH):
                out, got = torch.func.jvp(attention, (q, k, v), tangents)
        else:
            out, got = torch.func.jvp(attention, (q, k, v), tangents)
        assert torch.allclose(out, math_attention(q, k, v), rtol=0, atol=1e-10)
        assert torch.allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", SIZES)
def test_forward_ad_equals_math_backend_jvp(n):
    q, k, v, dq, dk, dv = _qkv(n, count=6, seed=1)
    _, want = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))
        got = fwAD.unpack_dual(out).tangent
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    # a tangent on one input only (the others carry none)
    _, want_k = torch.func.jvp(lambda k_: math_attention(q, k_, v), (k,), (dk,))
    with fwAD.dual_level():
        got_k = fwAD.unpack_dual(attention(q, fwAD.make_dual(k, dk), v)).tangent
    assert torch.allclose(got_k, want_k, rtol=0, atol=1e-10)


def test_plain_sdpa_has_no_forward_ad_on_its_fast_kernel_but_ours_does():
    """The reason for this module: without the math context, SDPA's fast kernel cannot be
    used under torch.func.jvp; ``attention`` can (and gives the math backend's tangent)."""
    q, k, v = _qkv(40, dtype=torch.float32)
    try:
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q, k, v))
    except RuntimeError as e:
        assert "forward AD" in str(e)
    else:
        pytest.skip("this PyTorch picked a kernel with forward AD; nothing to contrast")
    _, got = torch.func.jvp(attention, (q, k, v), (q, k, v))
    _, want = torch.func.jvp(math_attention, (q, k, v), (q, k, v))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("through_jvp", [False, True])
def test_gradient_equals_math_backend(n, through_jvp):
    """The primal output keeps a graph: a loss on it (also when it comes out of
    torch.func.jvp, as in total_derivative) back-propagates like the math backend."""
    q, k, v, dq, dk, dv, w = _qkv(n, count=7, seed=2)
    ours = [a.clone().requires_grad_() for a in (q, k, v)]
    ref = [a.clone().requires_grad_() for a in (q, k, v)]
    if through_jvp:
        out, tangent = torch.func.jvp(attention, tuple(ours), (dq, dk, dv))
        loss = (out * w).sum() + (out * tangent.detach()).sum()
        ref_out = math_attention(*ref)
        ref_loss = (ref_out * w).sum() + (ref_out * tangent.detach()).sum()
    else:  # an open forward-mode level selects the Function (its chunked backward)
        with fwAD.dual_level():
            loss = (attention(*ours) * w).sum()
        ref_loss = (math_attention(*ref) * w).sum()
    for got, want in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(ref_loss, ref)):
        assert torch.allclose(got, want, rtol=0, atol=1e-10)


def test_gradcheck_and_double_backward():
    q, k, v = (a.requires_grad_() for a in _qkv(6, b=1, h=2, d=3))
    with fwAD.dual_level():  # the Function's rules, not plain SDPA
        assert torch.autograd.gradcheck(attention, (q, k, v))
        assert torch.autograd.gradgradcheck(attention, (q, k, v))


@pytest.mark.parametrize("math_context", [False, True])
def test_dit_total_derivative_matches_finite_differences(math_context):
    """Through ``meanflow.flow.jvp.total_derivative`` (which may or may not force the math backend)
    and directly under torch.func.jvp without any backend choice."""
    torch.manual_seed(0)
    model = perturbed(dit("T/2", input_size=8, in_channels=4, num_classes=10).double())
    z, r, t, v, g = jvp_inputs((4, 8, 8), 3)
    y = torch.randint(0, 10, (3,), generator=g)
    if math_context:
        assert_total_derivative_matches_fd(model, z, r, t, v, y)
    else:
        h = 1e-5
        _, dudt = torch.func.jvp(lambda z_, t_: model(z_, r, t_, y), (z, t),
                                 (v, torch.ones_like(t)))
        fd = (model(z + h * v, r, t + h, y) - model(z - h * v, r, t - h, y)) / (2 * h)
        assert torch.allclose(dudt, fd, atol=1e-7, rtol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def _largest_in_jvp_and_backward(fn, n, b=1, h=2, d=16):
    q, k, v, dq, dk, dv = _qkv(n, b=b, h=h, d=d, dtype=torch.float32, count=6)
    q, k, v = (a.requires_grad_() for a in (q, k, v))
    with _LargestTensor() as mode:
        out, tangent = torch.func.jvp(fn, (q, k, v), (dq, dk, dv))
        (out * tangent.detach()).sum().backward()
    return mode.largest


def test_jvp_and_backward_memory_is_linear_in_n():
    """Memory, counted by construction: every tensor created by every ATen op during the
    JVP and the backward (recorded with a dispatch mode, so on CPU as on GPU) has at most
    B H chunk N elements; the math backend's N x N score matrix is 16x larger at N = 2048,
    and the largest tensor doubles (not quadruples) when N doubles."""
    b, h, n = 1, 2, 2048
    ours = _largest_in_jvp_and_backward(attention, n, b, h)
    assert ours <= b * h * DEFAULT_CHUNK * n
    assert _largest_in_jvp_and_backward(math_attention, n, b, h) >= b * h * n * n
    half = _largest_in_jvp_and_backward(attention, n // 2, b, h)
    assert ours == 2 * half


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak allocator memory needs CUDA "
                    "(the CPU allocator keeps no statistics); the CPU test counts tensors")
def test_cuda_peak_memory_of_jvp_within_budget():
    b, h, n, d = 2, 4, 8192, 64
    q, k, v, dq, dk, dv = (t.cuda() for t in _qkv(n, b, h, d, torch.float32, count=6))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    scores = b * h * n * n * 4                       # one full N x N matrix in float32: 2 GiB
    assert peak < scores / 8, (peak, scores)


# --- the fused (jvp-flash-attention) back-end: dispatch and fallback, tested on CPU with a
# stand-in kernel that records its calls and computes the chunked rule ---

class _FakeFused:
    calls: list = []

    @staticmethod
    def fwd_dual(q, k, v, sm_scale=None):
        for a in (q, k, v):  # the kernel reads primal and tangent as contiguous tensors
            primal, tangent = fwAD.unpack_dual(a)
            assert primal.is_contiguous() and tangent.is_contiguous()
        _FakeFused.calls.append(tuple(q.shape))
        return attention_module._Attention.apply(q, k, v, sm_scale)


@pytest.fixture
def fake_fused(monkeypatch):
    _FakeFused.calls = []
    monkeypatch.setattr(attention_module, "_load_fused", lambda: (_FakeFused, None))
    monkeypatch.setattr(attention_module, "_FUSED_DEVICES", ("cuda", "cpu"))
    return _FakeFused


def _dual_attention(q, k, v, tangents):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip((q, k, v), tangents)]
        return fwAD.unpack_dual(attention(*duals)).tangent


def test_fused_backend_is_chosen_where_it_applies_with_the_same_numbers(fake_fused):
    q, k, v, dq, dk, dv = _qkv(64, d=16, dtype=torch.float32, count=6)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, as after a head split
    dk = dk.transpose(1, 2).contiguous().transpose(1, 2)
    ours = _dual_attention(q, k, v, (dq, dk, dv))
    assert fake_fused.calls == [(2, 3, 64, 16)]
    with attention_jvp_backend("chunked"):
        chunked = _dual_attention(q, k, v, (dq, dk, dv))
    assert len(fake_fused.calls) == 1  # "chunked" never calls the fused kernel
    torch.testing.assert_close(ours, chunked)


@pytest.mark.parametrize(
    "n,d,dtype,why",
    [(30, 16, torch.float32, "length 30"), (64, 24, torch.float32, "head dim 24"),
     (64, 16, torch.float64, "dtype")],
)
def test_unsupported_shapes_fall_back_to_the_chunked_rule(fake_fused, n, d, dtype, why):
    q, k, v, dq, dk, dv = _qkv(n, d=d, dtype=dtype, count=6)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip((q, k, v), (dq, dk, dv))]
        choice, reason = attention_jvp_choice(*duals)
    assert choice == "chunked" and why in reason
    got = _dual_attention(q, k, v, (dq, dk, dv))
    assert fake_fused.calls == []
    _, ref = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(got, ref)
    with attention_jvp_backend("fused"), pytest.raises(MeanFlowError, match=why):
        _dual_attention(q, k, v, (dq, dk, dv))


def test_torch_func_and_missing_tangents_use_the_chunked_rule(fake_fused):
    q, k, v, dq, dk, dv = _qkv(64, d=16, dtype=torch.float32, count=6)
    torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    with fwAD.dual_level():  # k and v without tangents
        attention(fwAD.make_dual(q, dq), k, v)
    assert fake_fused.calls == []


def test_without_the_package_or_off_cuda_the_chunked_rule_runs_silently(monkeypatch, recwarn):
    monkeypatch.setattr(attention_module, "_load_fused", lambda: (None, "not installed"))
    q, k, v, dq, dk, dv = _qkv(64, d=16, dtype=torch.float32, count=6)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip((q, k, v), (dq, dk, dv))]
        assert attention_jvp_choice(*duals) == ("chunked", "not installed")
    _dual_attention(q, k, v, (dq, dk, dv))
    assert not [w for w in recwarn if "attention JVP" in str(w.message)]  # CPU: nothing to say
    with attention_jvp_backend("fused"), pytest.raises(MeanFlowError, match="not installed"):
        _dual_attention(q, k, v, (dq, dk, dv))
    with pytest.raises(MeanFlowError, match="attention JVP back-end must be one of"):
        with attention_jvp_backend("flash"):
            pass


def test_real_package_loads_or_says_why():
    attention_module._load_fused.cache_clear()
    fused, why = attention_module._load_fused()
    assert (fused is None) != (why is None)
    if fused is None:
        assert "jvp-flash-attention" in why


def test_gpu_check_fused_section_is_skipped_without_cuda_with_its_reason():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from fused_attention import check_fused_attention, table

    res = check_fused_attention(torch.device("cpu"))
    assert "no CUDA device" in res["skipped"]
    assert table(res) == [f"fused attention JVP: skipped ({res['skipped']})"]
