"""The lean forward-mode rules of the normalisation layers (group, layer and RMS norm) as
``torch.autograd.Function`` s.

Each ``jvp`` computes only the terms whose tangent is present (package docstring); the group and
layer norms' ``backward`` call the ATen kernels autograd would (``native_group_norm_backward``,
``native_layer_norm_backward``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rules import _add, _rule_context

__all__: list[str] = []


class _GroupNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, groups, weight, bias, eps):
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm(
            x.contiguous(), weight, bias, n, c, x[0, 0].numel(), groups, eps
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        x, ctx.groups, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.save_for_forward(x, mean, rstd, weight)
        ctx.affine = (weight is not None, bias is not None)

    @staticmethod
    def backward(ctx, grad, _mean, _rstd):
        if grad is None:
            return (None,) * 5
        x, mean, rstd, weight = ctx.saved_tensors
        n, c = x.shape[:2]
        mask = [
            ctx.needs_input_grad[0],
            ctx.affine[0] and ctx.needs_input_grad[2],
            ctx.affine[1] and ctx.needs_input_grad[3],
        ]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(),
            x.contiguous(),
            mean,
            rstd,
            weight,
            n,
            c,
            x[0, 0].numel(),
            ctx.groups,
            mask,
        )
        return gx, None, gw, gb, None

    @staticmethod
    def jvp(ctx, dx, _groups, dweight, dbias, _eps):
        x, mean, rstd, weight = ctx.saved_tensors
        n, c = x.shape[:2]
        grouped = (n, ctx.groups, -1)
        channel = (1, c) + (1,) * (x.dim() - 2)
        with _rule_context():
            out = None
            if dx is not None:  # the unit-affine Jacobian is symmetric: backward's kernel
                out = torch.ops.aten.native_group_norm_backward(
                    dx.contiguous(),
                    x.contiguous(),
                    mean,
                    rstd,
                    None,
                    n,
                    c,
                    x[0, 0].numel(),
                    ctx.groups,
                    [True, False, False],
                )[0]
                if weight is not None:
                    out = out * weight.reshape(channel)
            if dweight is not None:
                x_hat = (x.reshape(grouped) - mean[..., None]) * rstd[..., None]
                out = _add(out, x_hat.reshape(x.shape) * dweight.reshape(channel))
            out = _add(out, None if dbias is None else dbias.reshape(channel))
            out = torch.zeros_like(x) if out is None else out.expand(x.shape)
            return out, None, None


class _LayerNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, shape, weight, bias, eps):
        return torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        x, ctx.shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.save_for_forward(x, mean, rstd, weight)

    @staticmethod
    def backward(ctx, grad, _mean, _rstd):
        if grad is None:
            return (None,) * 5
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3],
        ]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), x, ctx.shape, mean, rstd, weight, bias, mask
        )
        return gx, None, gw, gb, None

    @staticmethod
    def jvp(ctx, dx, _shape, dweight, dbias, _eps):
        x, mean, rstd, weight = ctx.saved_tensors
        with _rule_context():
            out = None
            if dx is not None:  # the unit-affine Jacobian is symmetric: backward's kernel
                out = torch.ops.aten.native_layer_norm_backward(
                    dx.contiguous(), x, ctx.shape, mean, rstd, None, None, [True, False, False]
                )[0]
                if weight is not None:
                    out = out * weight
            if dweight is not None:
                out = _add(out, (x - mean) * rstd * dweight)
            out = _add(out, dbias)
            out = torch.zeros_like(x) if out is None else out.expand(x.shape)
            return out, None, None


class _RMSNorm(torch.autograd.Function):
    """``F.rms_norm``: ``y = x_hat * gamma``, ``x_hat = x * rstd``, ``rstd = (mean(x^2) + eps)
    ** -1/2`` over the last dims; tangent ``gamma * rstd * (dx - x_hat * mean(x_hat * dx)) +
    x_hat * dgamma`` (the bracket is symmetric: backward uses it too)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, shape, weight, eps):
        dims = tuple(range(-len(shape), 0))
        rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return F.rms_norm(x, shape, weight, eps), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        x, shape, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.dims = tuple(range(-len(shape), 0))
        ctx.save_for_backward(x, output[1], weight)
        ctx.save_for_forward(x, output[1], weight)

    @staticmethod
    def _unit(g, x_hat, rstd, dims):
        return rstd * (g - x_hat * (x_hat * g).mean(dims, keepdim=True))

    @staticmethod
    def backward(ctx, grad, _rstd):
        if grad is None:
            return (None,) * 4
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _RMSNorm._unit(grad if weight is None else grad * weight, x_hat, rstd, ctx.dims)
        if weight is not None and ctx.needs_input_grad[2]:
            gw = (grad * x_hat).reshape(-1, *weight.shape).sum(0)
        return gx, None, gw, None

    @staticmethod
    def jvp(ctx, dx, _shape, dweight, _eps):
        x, rstd, weight = ctx.saved_tensors
        with _rule_context():
            x_hat = x * rstd
            out = None
            if dx is not None:
                out = _RMSNorm._unit(dx, x_hat, rstd, ctx.dims)
                if weight is not None:
                    out = out * weight
            if dweight is not None:
                out = _add(out, x_hat * dweight)
            return (torch.zeros_like(x) if out is None else out.expand(x.shape)), None
