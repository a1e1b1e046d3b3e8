"""Fused ops with lean forward-mode rules for the DiT's adaLN-Zero blocks and its time features.

With ``x`` of shape (B, N, D) and per-sample ``shift``, ``scale``, ``gate`` of shape (B, D)
(broadcast over the N tokens), and ``s`` of shape (B,) with fixed frequencies ``w`` (K,):

    modulate(x, shift, scale) = x * (1 + scale) + shift
        tangent:  dx * (1 + scale) + x * dscale + dshift
    gated_add(x, gate, f) = x + gate * f
        tangent:  dx + gate * df + dgate * f
    sinusoid(s, w) = [cos(s w), sin(s w)]                           (B, 2K)
        tangent:  ds * [-w sin(s w), w cos(s w)]

PyTorch's own forward-mode formulas for these expressions on dual tensors take 20-30 ATen ops
each (broadcasting, zero tangents, reductions it records for double backward): in DiT-T/2's
JVP the three made a third of all ops. Each rule here computes only the terms whose tangent is
present, without autograd graph when :func:`.rules.tangents_without_graph` is on, and its
backward is the plain chain rule. Outside forward-mode transforms
(:func:`.rules.lean_rules_active`) each function is the plain expression, with the same
numbers.
"""

from __future__ import annotations

import torch

from .rules import _add, _rule_context, lean_rules_active

__all__ = ["modulate", "gated_add", "sinusoid"]


class _Modulate(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, shift, scale):
        return x * (1 + scale[:, None]) + shift[:, None]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        x, _shift, scale = inputs
        ctx.save_for_backward(x, scale)
        ctx.save_for_forward(x, scale)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, scale = ctx.saved_tensors
        need_x, need_shift, need_scale = ctx.needs_input_grad
        gx = grad * (1 + scale[:, None]) if need_x else None
        gshift = grad.sum(1) if need_shift else None
        gscale = (grad * x).sum(1) if need_scale else None
        return gx, gshift, gscale

    @staticmethod
    def jvp(ctx, dx, dshift, dscale):
        x, scale = ctx.saved_tensors
        with _rule_context():
            out = None if dx is None else dx * (1 + scale[:, None])
            if dscale is not None:
                out = x * dscale[:, None] if out is None else out.addcmul_(x, dscale[:, None])
            out = _add(out, None if dshift is None else dshift[:, None])
            return torch.zeros_like(x) if out is None else out.expand_as(x)


class _GatedAdd(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, gate, f):
        return x + gate[:, None] * f

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        _x, gate, f = inputs
        ctx.save_for_backward(gate, f)
        ctx.save_for_forward(gate, f)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        gate, f = ctx.saved_tensors
        need_x, need_gate, need_f = ctx.needs_input_grad
        ggate = (grad * f).sum(1) if need_gate else None
        gf = grad * gate[:, None] if need_f else None
        return (grad if need_x else None), ggate, gf

    @staticmethod
    def jvp(ctx, dx, dgate, df):
        gate, f = ctx.saved_tensors
        with _rule_context():
            out = None if df is None else df * gate[:, None]
            if dgate is not None:
                out = f * dgate[:, None] if out is None else out.addcmul_(f, dgate[:, None])
            out = _add(out, dx)
            return torch.zeros_like(f) if out is None else out.expand_as(f)


class _Sinusoid(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(s, freqs):
        angles = s[:, None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[1], output)
        ctx.save_for_forward(inputs[1], output)

    @staticmethod
    def _slope(freqs, output):
        """d/ds of the features: ``[-w sin(s w), w cos(s w)]``, from the output ``[cos, sin]``."""
        cos, sin = output.chunk(2, dim=1)
        return torch.cat([-sin, cos], dim=1) * torch.cat([freqs, freqs])

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        freqs, output = ctx.saved_tensors  # the frequencies are a fixed buffer: no gradient
        return (grad * _Sinusoid._slope(freqs, output)).sum(1), None

    @staticmethod
    def jvp(ctx, ds, dfreqs):
        freqs, output = ctx.saved_tensors  # dfreqs: None, the frequencies are fixed
        with _rule_context():
            if ds is None:
                return torch.zeros_like(output)
            return ds[:, None] * _Sinusoid._slope(freqs, output)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` for (B, N, D) ``x`` and (B, D) ``shift``,
    ``scale``, with the lean forward-mode rule inside forward-mode transforms."""
    if lean_rules_active():
        return _Modulate.apply(x, shift, scale)
    return x * (1 + scale[:, None]) + shift[:, None]


def gated_add(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The adaLN-Zero residual ``x + gate * f`` for (B, N, D) ``x``, ``f`` and a (B, D) ``gate``,
    with the lean forward-mode rule inside forward-mode transforms."""
    if lean_rules_active():
        return _GatedAdd.apply(x, gate, f)
    return x + gate[:, None] * f


def sinusoid(s: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``[cos(s w), sin(s w)]`` (B, 2K) for times ``s`` (B,) and fixed frequencies ``w`` (K,),
    with the lean forward-mode rule inside forward-mode transforms."""
    if lean_rules_active():
        return _Sinusoid.apply(s, freqs)
    angles = s[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)
