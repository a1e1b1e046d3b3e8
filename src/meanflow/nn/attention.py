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
:func:`meanflow.flow.jvp.total_derivative` is not needed (it is harmless: it only changes the kernel
of the forward). Half-precision inputs are upcast to float32 inside the chunked rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .forward_mode import lean_rules_active

__all__ = ["attention", "attention_jvp", "DEFAULT_CHUNK"]

#: queries per block in the JVP and backward rules.
DEFAULT_CHUNK = 128


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
) -> torch.Tensor:
    """Tangent ``dO`` of ``O = attention(q, k, v)`` (given as ``out``) along ``(dq, dk, dv)``
    (None means zero), in query blocks of ``chunk``: ``dO = (P * dS) V - c * O + P dV``."""
    dtype = _compute_dtype(q)
    q, k, v, out = (a.to(dtype) for a in (q, k, v, out))
    dq, dk, dv = (None if a is None else a.to(dtype) for a in (dq, dk, dv))
    scale = 1.0 / math.sqrt(q.shape[-1])
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


def _attention_backward(q, k, v, out, grad, chunk: int = DEFAULT_CHUNK):
    dtype = _compute_dtype(q)
    q, k, v, out, grad = (a.to(dtype) for a in (q, k, v, out, grad))
    scale = 1.0 / math.sqrt(q.shape[-1])
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
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        q, k, v = inputs
        ctx.save_for_backward(q, k, v, output)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        q, k, v, out = ctx.saved_tensors
        dq, dk, dv = _attention_backward(q, k, v, out, grad)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v, out = ctx.saved_tensors
        return attention_jvp(q, k, v, out, dq, dk, dv).to(out.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` for (B, H, N, D) inputs: SDPA's fast kernel forward, a
    chunked forward-mode rule (usable in ``torch.func.jvp`` / ``forward_ad``) and a chunked
    backward. See the module docstring for the equations. Outside forward-mode transforms
    (:func:`meanflow.nn.forward_mode.lean_rules_active`) it is plain SDPA, forward and
    backward."""
    if not lean_rules_active():
        return F.scaled_dot_product_attention(q, k, v)
    return _Attention.apply(q, k, v)
