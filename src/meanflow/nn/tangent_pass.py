"""The DiT's and the U-Net's forward with tangents: ``u`` for every row and ``du`` along a
tangent ``(dz, dr, dt)`` on ``(z, r, t)`` for chosen rows, in one pass of (value, tangent)
pairs, without forward-mode dual tensors.

MeanFlow needs ``du/dt`` on its r != t rows only and never differentiates it (the target is
stop-gradient). Forward-mode AD pays for generality here: a dual tensor per activation, an
``autograd.Function`` per layer whose Python backward then replaces autograd's own, the batch
split into r != t and r = t halves (twice the launches), and tangents of every saved
activation kept until the dual level closes. This pass is the plain forward on the whole batch
(autograd records exactly the graph flow matching's forward records, so the backward is the
same), and beside each layer, under ``no_grad``, the tangent of the chosen rows from the
primal's values (docs/method.md, "Layers with lean forward-mode rules", has the formulas):

    Linear, Conv:  W dx                       LayerNorm, GroupNorm: gamma J_n dx (backward kernel)
    SiLU/GELU: f'(x) dx                       modulate:  dx (1 + s) + x ds + dm
    gated residual:  dx + g df + dg f         dropout:  dx * mask / (1 - p) (the value's mask)
    attention: (P * dS) V - c O + P dV       (:func:`.attention.attention_jvp`)
    time features:  ds [-w sin(s w), w cos(s w)]

It is exact (the products of the forward-mode rules, in the input's dtype) and tested against
``torch.func.jvp``. :func:`meanflow.flow.jvp.total_derivative` uses it without graph when the
network offers it (``DiT.tangent_forward``, ``UNet.tangent_forward``);
:func:`meanflow.flow.jvp.rows_derivative` with the graph, for MeanFlow's r != t rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_jvp
from .embeddings import guidance_features, no_guidance

if TYPE_CHECKING:
    from .dit import Block, DiT, FinalLayer
    from .embeddings import Conditioning, TimestepEmbedder
    from .unet import AttentionBlock, ResBlock, UNet

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


def _attention(attn, pair: Pair, rows: Rows) -> Pair:
    b, n, d = pair[0].shape
    qkv, dqkv = _linear(attn.qkv, pair, rows)
    split = (3, attn.heads, d // attn.heads)
    q, k, v = qkv.reshape(b, n, *split).permute(2, 0, 3, 1, 4)
    out, dout = _sdpa(q, k, v, tuple(dqkv.reshape(-1, n, *split).permute(2, 0, 3, 1, 4)), rows)
    merged = (out.transpose(1, 2).reshape(b, n, d), dout.transpose(1, 2).reshape(-1, n, d))
    return _linear(attn.proj, merged, rows)


def _block(block: Block, x: Pair, c: Pair, rows: Rows) -> Pair:
    ada, dada = _linear(block.ada[1], _silu(c, rows), rows)
    shift1, scale1, gate1, shift2, scale2, gate2 = zip(ada.chunk(6, dim=1), dada.chunk(6, dim=1))
    h = _modulate(_layer_norm(block.norm1, x, rows), shift1, scale1, rows)
    x = _gated_add(x, gate1, _attention(block.attn, h, rows), rows)
    h = _modulate(_layer_norm(block.norm2, x, rows), shift2, scale2, rows)
    lin1, gelu, lin2 = block.mlp
    approximate = cast(nn.GELU, gelu).approximate
    h = _linear(lin2, _gelu(_linear(lin1, h, rows), rows, approximate), rows)
    return _gated_add(x, gate2, h, rows)


def _final(final: FinalLayer, x: Pair, c: Pair, rows: Rows) -> Pair:
    ada, dada = _linear(final.ada[1], _silu(c, rows), rows)
    shift, scale = zip(ada.chunk(2, dim=1), dada.chunk(2, dim=1))
    return _linear(
        final.linear, _modulate(_layer_norm(final.norm, x, rows), shift, scale, rows), rows
    )


def dit_tangent_forward(
    model: DiT,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    dz: torch.Tensor,
    dr: torch.Tensor,
    dt: torch.Tensor,
    rows: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
) -> Pair:
    """``(u, du)``: ``model(z, r, t, y, guidance)`` on every row, with autograd graph where grad
    is enabled, and its derivative along ``(dz, dr, dt)`` on rows ``rows`` of the batch (None:
    all; the tangents have those rows only), without graph. The ``u`` head only."""
    sel = _rows(rows)
    dtype = z.dtype
    with torch.no_grad():
        dz, dr, dt = (a.to(dtype) for a in (dz, dr, dt))
        dtokens = F.conv2d(dz, model.patchify.weight, None, stride=model.patch)
        dtokens = dtokens.flatten(2).transpose(1, 2).contiguous()
    c = _condition(model.cond, (r.to(dtype), dr), (t.to(dtype), dt), y, guidance, sel)
    tokens = model.patchify(z).flatten(2).transpose(1, 2) + model.pos_embed.to(dtype)
    x = (tokens, dtokens)
    for block in cast("list[Block]", model.blocks):  # typed nn.Module by ModuleList
        x = _block(block, x, c, sel)
    u, du = _final(model.final, x, c, sel)
    with torch.no_grad():
        du = model.unpatchify(du)
    return model.unpatchify(u), du


def _res_block(block: ResBlock, x: Pair, emb: Pair, rows: Rows) -> Pair:
    h = _conv(block.conv1, _silu(_group_norm(block.norm1, x, rows), rows), rows)
    e, de = _linear(block.emb, emb, rows)
    (scale, shift), (dscale, dshift) = (a[:, :, None, None].chunk(2, dim=1) for a in (e, de))
    hn, dhn = _group_norm(block.norm2, h, rows)
    mod = hn * (1 + scale) + shift
    with torch.no_grad():
        dmod = (dhn * (1 + rows(scale))).addcmul_(rows(hn), dscale).add_(dshift)
    h = _silu((mod, dmod), rows)
    h = _conv(block.conv2, _dropout(cast(nn.Dropout, block.dropout), h, rows), rows)
    skip = x if isinstance(block.skip, nn.Identity) else _conv(block.skip, x, rows)
    return skip[0] + h[0], skip[1] + h[1]


def _attention_block(block: AttentionBlock, x: Pair, rows: Rows) -> Pair:
    b, ch, hgt, wid = x[0].shape
    qkv, dqkv = _conv(block.qkv, _group_norm(block.norm, x, rows), rows)
    split = (3, block.heads, ch // block.heads, hgt * wid)
    q, k, v = qkv.reshape(b, *split).transpose(-1, -2).unbind(1)
    d = tuple(dqkv.reshape(-1, *split).transpose(-1, -2).unbind(1))
    out, dout = _sdpa(q, k, v, d, rows)
    out = out.transpose(-1, -2).reshape(b, ch, hgt, wid).contiguous()
    dout = dout.transpose(-1, -2).reshape(-1, ch, hgt, wid).contiguous()
    p, dp = _conv(block.proj, (out, dout), rows)
    return x[0] + p, x[1] + dp


def _stage(stage: nn.ModuleList, x: Pair, emb: Pair, rows: Rows) -> Pair:
    from .unet import AttentionBlock, Downsample, ResBlock, Upsample

    for block in stage:
        if isinstance(block, ResBlock):
            x = _res_block(block, x, emb, rows)
        elif isinstance(block, AttentionBlock):
            x = _attention_block(block, x, rows)
        elif isinstance(block, Downsample):
            x = _conv(block.conv, x, rows)
        else:
            assert isinstance(block, Upsample), type(block)
            up = (F.interpolate(a, scale_factor=2.0, mode="nearest") for a in x)
            x = _conv(block.conv, cast(Pair, tuple(up)), rows)
    return x


def unet_tangent_forward(
    model: UNet,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    dz: torch.Tensor,
    dr: torch.Tensor,
    dt: torch.Tensor,
    rows: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
) -> Pair:
    """:func:`dit_tangent_forward` for the U-Net (:class:`meanflow.nn.unet.UNet`); dropout
    applies the same mask to the value and the tangent."""
    sel = _rows(rows)
    dtype = z.dtype
    with torch.no_grad():
        dz, dr, dt = (a.to(dtype) for a in (dz, dr, dt))
    c = _condition(model.cond, (r.to(dtype), dr), (t.to(dtype), dt), y, guidance, sel)
    emb = _silu(c, sel)
    h = _conv(model.conv_in, (z, dz), sel)
    hs = [h]
    for stage in model.down:
        h = _stage(cast(nn.ModuleList, stage), h, emb, sel)
        hs.append(h)
    h = _stage(model.mid, h, emb, sel)
    for stage in model.up:
        skip = hs.pop()
        h = _stage(
            cast(nn.ModuleList, stage),
            (torch.cat([h[0], skip[0]], 1), torch.cat([h[1], skip[1]], 1)),
            emb,
            sel,
        )
    norm, _, conv = model.out
    return _conv(
        cast(nn.Conv2d, conv), _silu(_group_norm(cast(nn.GroupNorm, norm), h, sel), sel), sel
    )
