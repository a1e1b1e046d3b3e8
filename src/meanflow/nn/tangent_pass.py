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

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import guidance_features, no_guidance, time_quantities
from .tangent_ops import (
    Pair,
    Rows,
    _condition,
    _conv,
    _dropout,
    _gated_add,
    _gelu,
    _group_norm,
    _layer_norm,
    _linear,
    _modulate,
    _rows,
    _sdpa,
    _silu,
    _sinusoidal,
)

if TYPE_CHECKING:
    from .dit import Block, DiT, FinalLayer
    from .mlp import MLP
    from .unet import AttentionBlock, ResBlock, UNet


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


def mlp_tangent_forward(
    model: MLP,
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
    """:func:`dit_tangent_forward` for the vector MLP (:class:`meanflow.nn.mlp.MLP`)."""
    sel = _rows(rows)
    dtype = z.dtype
    with torch.no_grad():
        dz, dr, dt = (a.to(dtype) for a in (dz, dr, dt))
    r, t = r.to(dtype), t.to(dtype)
    times = zip(time_quantities(model.time.kind, r, t), time_quantities(model.time.kind, dr, dt))
    parts: list[tuple[torch.Tensor, torch.Tensor | None]]  # labels, guidance: no tangent
    parts = [_sinusoidal(model.time.embed, pair, sel) for pair in times]
    if model.label is not None:
        if y is None:
            y = torch.full((z.shape[0],), model.num_classes, device=z.device, dtype=torch.long)
        parts.append((model.label(y), None))
    if model.guidance is not None:  # guidance inputs carry no tangent
        g = no_guidance(z.shape[0], z) if guidance is None else guidance.to(dtype)
        parts += [(model.guidance(s), None) for s in guidance_features(g)]
    c = torch.cat([p[0] for p in parts], dim=1)
    enc = model.encode(z)
    with torch.no_grad():
        n = dz.shape[0]
        dc = torch.cat(
            [p[1] if p[1] is not None else p[0].new_zeros(n, p[0].shape[1]) for p in parts], dim=1
        )
        denc = dz
        if model.z_features:  # [z, sin(w z), cos(w z)]: tangent [dz, w cos dz, -w sin dz]
            angles = (sel(z)[:, :, None] * model.z_freqs.to(dtype)).flatten(1)
            w_dz = (dz[:, :, None] * model.z_freqs.to(dtype)).flatten(1)
            denc = torch.cat([dz, angles.cos() * w_dz, -angles.sin() * w_dz], dim=1)
    h = _silu(_linear(model.inp, (torch.cat([enc, c], dim=1), torch.cat([denc, dc], 1)), sel), sel)
    for layer, cond in zip(model.layers, model.cond):
        a, da = _linear(layer, h, sel)
        b, db = _linear(cond, (c, dc), sel)
        h = _silu((a + b, da + db), sel)
    return _linear(model.out, h, sel)
