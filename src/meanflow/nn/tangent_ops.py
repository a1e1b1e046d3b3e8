"""(value, tangent) pair rules for the one-pass forward with tangents (:mod:`.tangent_pass`):
each maps a primal computed as the plain forward computes it (with autograd graph where grad is
enabled) and the tangent of chosen rows (``rows``: those rows of a primal, detached) to the
layer's output and its tangent, the tangent under ``no_grad``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_jvp
from .embeddings import guidance_features, no_guidance

if TYPE_CHECKING:
    from .embeddings import Conditioning, SinusoidalEmbedding, TimestepEmbedder

Pair = tuple[torch.Tensor, torch.Tensor]
Rows = Callable[[torch.Tensor], torch.Tensor]


def _rows(idx: torch.Tensor | None) -> Rows:
    """The tangent's rows of a primal tensor, without graph."""
    if idx is None:
        return lambda a: a.detach()
    return lambda a: a.detach()[idx]


def _linear(layer, pair: Pair, rows: Rows) -> Pair:
    x, dx = pair
    y = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        return y, F.linear(dx, layer.weight)


def _silu(pair: Pair, rows: Rows) -> Pair:
    x, dx = pair
    y = F.silu(x)
    with torch.no_grad():
        return y, torch.ops.aten.silu_backward(dx, rows(x))


def _gelu(pair: Pair, rows: Rows, approximate: str) -> Pair:
    x, dx = pair
    y = F.gelu(x, approximate=approximate)
    with torch.no_grad():
        return y, torch.ops.aten.gelu_backward(dx, rows(x), approximate=approximate)


def _conv(conv: nn.Conv2d, pair: Pair, rows: Rows) -> Pair:
    x, dx = pair
    y = conv(x)
    with torch.no_grad():
        dy = F.conv2d(dx, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y, dy


def _group_norm(norm: nn.GroupNorm, pair: Pair, rows: Rows) -> Pair:
    """GroupNorm: the tangent is ``gamma * J_n dx``, ``J_n`` the unit-affine normalisation's
    Jacobian, which is symmetric: the backward kernel without weight, ``dx`` as cotangent."""
    x, dx = pair
    x = x.contiguous()
    n, c, hw = x.shape[0], x.shape[1], x[0, 0].numel()
    y, mean, rstd = torch.ops.aten.native_group_norm(
        x, norm.weight, norm.bias, n, c, hw, norm.num_groups, norm.eps
    )
    with torch.no_grad():
        dy = torch.ops.aten.native_group_norm_backward(
            dx.contiguous(),
            rows(x),
            rows(mean),
            rows(rstd),
            None,
            dx.shape[0],
            c,
            hw,
            norm.num_groups,
            [True, False, False],
        )[0]
        if norm.weight is not None:
            dy = dy * norm.weight.reshape(1, c, *([1] * (x.dim() - 2)))
    return y, dy


def _dropout(dropout: nn.Dropout, pair: Pair, rows: Rows) -> Pair:
    """The same mask on the value and the tangent (the mask of ``native_dropout``)."""
    x, dx = pair
    if not dropout.training or dropout.p == 0:
        return pair
    y, mask = torch.ops.aten.native_dropout(x, dropout.p, True)
    with torch.no_grad():
        return y, dx * rows(mask) * (1.0 / (1.0 - dropout.p))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: tuple, rows: Rows) -> Pair:
    """Attention ``(O, dO)`` of (B, H, N, D) ``q, k, v`` and the rows' tangents ``d``."""
    out = F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        dout = attention_jvp(rows(q), rows(k), rows(v), rows(out), *d).to(out.dtype)
    return out, dout


def _layer_norm(norm, pair: Pair, rows: Rows) -> Pair:
    """LayerNorm without affine: its unit-affine Jacobian is symmetric, so the backward kernel
    with ``dx`` as the cotangent is the tangent."""
    x, dx = pair
    shape = list(norm.normalized_shape)
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, None, None, norm.eps)
    with torch.no_grad():
        dy = torch.ops.aten.native_layer_norm_backward(
            dx.contiguous(),
            rows(x),
            shape,
            rows(mean),
            rows(rstd),
            None,
            None,
            [True, False, False],
        )[0]
    return y, dy


def _modulate(pair: Pair, shift: Pair, scale: Pair, rows: Rows) -> Pair:
    (x, dx), (m, dm), (s, ds) = pair, shift, scale
    y = x * (1 + s[:, None]) + m[:, None]
    with torch.no_grad():
        return y, (dx * (1 + rows(s)[:, None])).addcmul_(rows(x), ds[:, None]).add_(dm[:, None])


def _gated_add(pair: Pair, gate: Pair, branch: Pair, rows: Rows) -> Pair:
    (x, dx), (g, dg), (f, df) = pair, gate, branch
    y = x + g[:, None] * f
    with torch.no_grad():
        return y, (dx + rows(g)[:, None] * df).addcmul_(rows(f), dg[:, None])


def _time_embedding(embedder: TimestepEmbedder, pair: Pair, rows: Rows) -> Pair:
    s, ds = pair
    freqs = embedder.freqs.to(s.dtype)
    angles = s[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    feats = torch.cat([cos, sin], dim=1)
    with torch.no_grad():
        dfeats = ds[:, None] * torch.cat([-rows(sin), rows(cos)], dim=1) * torch.cat([freqs, freqs])
    lin1, _, lin2 = embedder.mlp
    return _linear(lin2, _silu(_linear(lin1, (feats, dfeats), rows), rows), rows)


def _condition(
    cond: Conditioning,
    r_pair: Pair,
    t_pair: Pair,
    y: torch.Tensor | None,
    guidance: torch.Tensor | None,
    rows: Rows,
) -> Pair:
    (r, dr), (t, dt) = r_pair, t_pair
    c, dc = _time_embedding(cond.t_embedder, (t, dt), rows)
    h, dh = _time_embedding(cond.h_embedder, (t - r, dt - dr), rows)
    c, dc = c + h, dc + dh
    if cond.label is not None:
        if y is None:
            y = torch.full((t.shape[0],), cond.num_classes, device=t.device, dtype=torch.long)
        c = c + cond.label(y)
    if cond.guidance is not None:  # guidance inputs carry no tangent
        g = no_guidance(t.shape[0], t) if guidance is None else guidance.to(t.dtype)
        for embed, s in zip(cond.guidance, guidance_features(g)):
            c = c + embed(s)
    return c, dc


def _sinusoidal(embed: SinusoidalEmbedding, pair: Pair, rows: Rows) -> Pair:
    """``[s, sin(w s), cos(w s)]`` and its tangent ``ds [1, w cos(w s), -w sin(w s)]``."""
    s, ds = pair
    y = embed(s)
    with torch.no_grad():
        k = embed.freqs.numel()
        sin, cos = rows(y[:, 1 : 1 + k]), rows(y[:, 1 + k :])
        freqs = embed.freqs.to(s.dtype)
        slope = torch.cat([torch.ones_like(ds)[:, None], freqs * cos, -freqs * sin], dim=1)
        return y, ds[:, None] * slope
