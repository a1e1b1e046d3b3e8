"""Scaled dot-product attention with its own forward-mode (JVP) and reverse-mode rules.

For one head, with ``Q, K, V`` of shape (N, D), ``s = 1 / sqrt(D)`` and rows indexed by i
(queries) and j (keys),

    S = s Q K^T,      P = softmax_j(S),      O = P V.

Forward: ``F.scaled_dot_product_attention`` with whatever kernel PyTorch picks (flash,
memory-efficient, math), so the primal pass is as fast as plain SDPA and never builds N x N.

JVP (forward mode), tangents ``dQ, dK, dV``:

    dS   = s (dQ K^T + Q dK^T)
    dP   = P * (dS - c 1^T),          c_i = sum_j P_ij dS_ij          (softmax's Jacobian)
    dO   = dP V + P dV = (P * dS) V - c * O + P dV                       (c broadcast over D)

computed over blocks of ``chunk`` queries at a time, so at most (chunk x N) scores per head
exist at once (memory O(chunk N), not O(N^2)); ``O`` comes from the forward.

Backward (reverse mode), cotangent ``G = dL/dO``, recomputed over the same query blocks:

    dP = G V^T,   r_i = sum_d G_id O_id  (= sum_j P_ij dP_ij),   dS = P * (dP - r 1^T)
    dL/dQ = s dS K,     dL/dK = s dS^T Q  (summed over blocks),     dL/dV = P^T G  (summed)

so backward too keeps O(chunk N) memory (the flash-attention backward recomputation, done in
plain PyTorch ops; the ops are differentiable, so double backward works too).

Because the rules are a ``torch.autograd.Function`` (functorch style: ``forward`` without ctx,
``setup_context``, ``backward``, ``jvp``, generated vmap rule), :func:`attention` works inside
``torch.func.jvp`` and ``torch.autograd.forward_ad`` with the fast kernels, the primal output
keeps its graph for the loss's backward, and the math-backend context of
:func:`meanflow.flow.jvp.total_derivative` (for PyTorch's own SDPA rule, which a masked call
still takes) is lifted inside its forward, which picks the fastest kernel (on CPU the math
kernel's forward cost DiT-T/2's JVP about 10%). Half-precision inputs are upcast to float32
inside the chunked rules.

Fused back-end (extra ``gpu``): on CUDA, with jvp-flash-attention installed, :func:`attention`
computes the forward, the JVP and the backward with that package's Triton kernel
(``JVPAttn.fwd_dual``, one pass per query block, no N x N tensor), where it applies
(:func:`attention_jvp_choice`: forward-AD dual (B, H, N, D) tensors, D in 16..256, N a multiple
of 32); elsewhere the chunked rules above, with a one-time warning on CUDA saying why.
:func:`attention_jvp_backend` forces ``"chunked"`` or ``"fused"``. benchmarks/gpu_check.py
(section (e)) records its errors against the float64 math kernel and its speed and memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import check
from .forward_mode import lean_rules_active

__all__ = [
    "attention",
    "attention_jvp",
    "attention_jvp_backend",
    "attention_jvp_choice",
    "ATTENTION_JVP_BACKENDS",
    "DEFAULT_CHUNK",
]

#: queries per block in the JVP and backward rules.
DEFAULT_CHUNK = 128
#: every SDPA kernel, the fastest first (PyTorch picks the first that applies).
_ANY_KERNEL = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def _compute_dtype(a: torch.Tensor) -> torch.dtype:
    return torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    chunk: int = DEFAULT_CHUNK,
    scale: float | None = None,
) -> torch.Tensor:
    """Tangent ``dO`` of ``O = attention(q, k, v)`` (given as ``out``) along ``(dq, dk, dv)``
    (None means zero), in query blocks of ``chunk``: ``dO = (P * dS) V - c * O + P dV``;
    ``scale`` None means ``1 / sqrt(D)``."""
    dtype = _compute_dtype(q)
    q, k, v, out = (a.to(dtype) for a in (q, k, v, out))
    dq, dk, dv = (None if a is None else a.to(dtype) for a in (dq, dk, dv))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kt = k.transpose(-2, -1)
    dkt = None if dk is None else dk.transpose(-2, -1)
    result = []
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        qc = q[..., rows, :]
        p = torch.softmax(scale * (qc @ kt), dim=-1)  # (..., C, N)
        ds = None
        if dq is not None:
            ds = dq[..., rows, :] @ kt
        if dkt is not None:
            ds = qc @ dkt if ds is None else ds + qc @ dkt
        if ds is None:  # only dV
            acc = torch.zeros_like(out[..., rows, :])
        else:
            ds = ds * scale
            pds = p * ds
            c = pds.sum(-1, keepdim=True)  # (..., C, 1)
            acc = pds @ v - c * out[..., rows, :]
        if dv is not None:
            acc = acc + p @ dv
        result.append(acc)
    return torch.cat(result, dim=-2)


def _attention_backward(q, k, v, out, grad, scale=None, chunk: int = DEFAULT_CHUNK):
    dtype = _compute_dtype(q)
    q, k, v, out, grad = (a.to(dtype) for a in (q, k, v, out, grad))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kt = k.transpose(-2, -1)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dq = []
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        qc, gc = q[..., rows, :], grad[..., rows, :]
        p = torch.softmax(scale * (qc @ kt), dim=-1)  # (..., C, N)
        dp = gc @ v.transpose(-2, -1)
        r = (gc * out[..., rows, :]).sum(-1, keepdim=True)
        ds = p * (dp - r) * scale
        dq.append(ds @ k)
        dk = dk + ds.transpose(-2, -1) @ qc
        dv = dv + p.transpose(-2, -1) @ gc
    return torch.cat(dq, dim=-2), dk, dv


class _Attention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale):
        # Any kernel: the JVP and backward below are ours, so the math-only context that
        # total_derivative sets for PyTorch's own SDPA rule need not slow this forward down.
        with sdpa_kernel(_ANY_KERNEL):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        q, k, v, ctx.scale = inputs
        ctx.save_for_backward(q, k, v, output)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        q, k, v, out = ctx.saved_tensors
        dq, dk, dv = _attention_backward(q, k, v, out, grad, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None

    @staticmethod
    def jvp(ctx, dq, dk, dv, _scale):
        q, k, v, out = ctx.saved_tensors
        return attention_jvp(q, k, v, out, dq, dk, dv, scale=ctx.scale).to(out.dtype)


#: attention JVP back-ends: "auto" (the fused kernel where it applies: CUDA, jvp-flash-attention
#: installed, shapes it supports; otherwise the chunked rule), "chunked", "fused" (or an error).
ATTENTION_JVP_BACKENDS = ("auto", "chunked", "fused")
_BACKEND = ["auto"]
_FUSED_DEVICES = ("cuda",)
_FUSED_HEAD_DIMS = (16, 32, 64, 128, 256)
_WARNED: set[str] = set()


@contextlib.contextmanager
def attention_jvp_backend(name: str):
    """Use the attention JVP back-end ``name`` (one of :data:`ATTENTION_JVP_BACKENDS`) inside
    this context; nests."""
    check(
        name in ATTENTION_JVP_BACKENDS,
        f"attention JVP back-end must be one of {', '.join(ATTENTION_JVP_BACKENDS)}, got {name!r}",
    )
    before, _BACKEND[0] = _BACKEND[0], name
    try:
        yield
    finally:
        _BACKEND[0] = before


@functools.cache
def _load_fused():
    """``(JVPAttn, None)`` from jvp-flash-attention, or ``(None, why not)``."""
    try:  # optional GPU dependency (Triton kernels): imported on first use only
        from jvp_flash_attention.jvp_attention import JVPAttn
    except ImportError:
        return None, "jvp-flash-attention is not installed (pip install 'meanflow[gpu]')"
    except Exception as exc:  # noqa: BLE001 - Triton may fail to load without a driver
        return None, f"jvp-flash-attention failed to load ({type(exc).__name__}: {exc})"
    return JVPAttn, None


def _fused_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the fused kernel cannot compute this call (None: it can). It takes forward-AD dual
    (B, H, N, D) tensors of one shape with tangents on all three, D in 16..256 (powers of 2),
    N a multiple of 32 (its backward's block), float32 / bfloat16 / float16, on CUDA."""
    if q.device.type not in _FUSED_DEVICES:
        return f"tensors are on {q.device.type}; the fused kernel needs CUDA"
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        return (
            f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} are not one (B, H, N, D)"
        )
    if q.shape[-1] not in _FUSED_HEAD_DIMS or q.shape[-2] % 32:
        d, n = q.shape[-1], q.shape[-2]
        return f"head dim {d} or length {n} unsupported (D in 16..256, N % 32 == 0)"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} unsupported"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "inside a torch.func transform (the kernel takes forward-AD dual tensors)"
    if fwAD._current_level < 0 or any(fwAD.unpack_dual(a).tangent is None for a in (q, k, v)):
        return "not forward-AD dual tensors with tangents on q, k and v"
    return None


def attention_jvp_choice(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[str, str | None]:
    """``("fused" | "chunked", reason)``: which JVP rule :func:`attention` uses for these
    tensors under the current back-end setting, and why not the fused kernel (None if fused)."""
    if _BACKEND[0] == "chunked":
        return "chunked", "attention JVP back-end set to chunked"
    fused, why = _load_fused()
    why = why or _fused_unsupported(q, k, v)
    return ("chunked", why) if why else ("fused", None)


def _contiguous_dual(a: torch.Tensor) -> torch.Tensor:
    """``a`` with a contiguous primal and tangent (the fused kernel reads both with the strides
    of a contiguous (B, H, N, D) tensor); the primal keeps its autograd graph."""
    primal, tangent = fwAD.unpack_dual(a)
    if primal.is_contiguous() and tangent.is_contiguous():
        return a
    return fwAD.make_dual(primal.contiguous(), tangent.contiguous())


def _dispatch(q, k, v, scale):
    choice, why = attention_jvp_choice(q, k, v)
    if choice == "fused":
        fused, _ = _load_fused()
        q, k, v = (_contiguous_dual(a) for a in (q, k, v))
        return fused.fwd_dual(q, k, v, sm_scale=scale)
    check(_BACKEND[0] != "fused", f"the fused attention JVP cannot run: {why}")
    if q.device.type == "cuda" and why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"attention JVP: using the chunked PyTorch rule, since {why}", stacklevel=3)
    return _Attention.apply(q, k, v, scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for (B, H, N, D) inputs (``scale`` None: ``1 / sqrt(D)``):
    SDPA's fast kernel forward, a forward-mode rule (usable in ``torch.func.jvp`` /
    ``forward_ad``) and its backward: the fused jvp-flash-attention kernel on CUDA where it
    applies (:func:`attention_jvp_choice`), otherwise the chunked rules of the module docstring
    (on CUDA with a one-time warning saying why). Outside forward-mode transforms
    (:func:`meanflow.nn.forward_mode.lean_rules_active`) it is plain SDPA, forward and
    backward."""
    if not lean_rules_active():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _dispatch(q, k, v, scale)
