"""The lean forward-mode rules as ``torch.autograd.Function`` s, and the switches that turn them
on (inside a forward-mode transform) and off (:func:`torch_rules`).

Each rule's ``jvp`` computes only the terms whose tangent is present (package docstring); its
``backward`` calls the ATen kernels autograd would (``convolution_backward``,
``native_group_norm_backward``, ``native_layer_norm_backward``, matrix products for linear).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

__all__ = [
    "silu",
    "gelu",
    "in_forward_transform",
    "lean_rules_active",
    "tangents_without_graph",
    "torch_rules",
    "torch_rules_enabled",
]

_WITHOUT_GRAPH = [0]
_TORCH_RULES = [0]


@contextlib.contextmanager
def torch_rules():
    """Use torch.nn's own layers and forward-mode formulas everywhere (the lean rules off), e.g.
    to compare against them (benchmarks/jvp_layers.py) or to rule them out when debugging;
    nests."""
    _TORCH_RULES[0] += 1
    try:
        yield
    finally:
        _TORCH_RULES[0] -= 1


def torch_rules_enabled() -> bool:
    """Whether :func:`torch_rules` is on (the lean rules and the networks' one pass off)."""
    return bool(_TORCH_RULES[0])


@contextlib.contextmanager
def tangents_without_graph():
    """Run the layers' forward-mode rules without recording autograd graph (for a detached
    ``du/dt``); nests."""
    _WITHOUT_GRAPH[0] += 1
    try:
        yield
    finally:
        _WITHOUT_GRAPH[0] -= 1


def _rule_context():
    return torch.no_grad() if _WITHOUT_GRAPH[0] else contextlib.nullcontext()


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def in_forward_transform() -> bool:
    """Whether a forward-mode transform may be watching: inside ``forward_ad.dual_level()`` or a
    ``torch.func`` transform."""
    return fwAD._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def lean_rules_active() -> bool:
    """Whether the layers use their lean rules: :func:`in_forward_transform` and not
    :func:`torch_rules`. Elsewhere they run torch.nn's own forward (no Python
    ``autograd.Function`` overhead, identical numbers)."""
    return not _TORCH_RULES[0] and in_forward_transform()


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _call(fn, x: torch.Tensor, *args, dtype: torch.dtype | None = None):
    """``fn(x, *args)``, or under autocast with the floating tensors cast to ``dtype`` (None:
    autocast's own dtype) and autocast off."""
    cast = _autocast_dtype(x)
    if cast is None:
        return fn(x, *args)
    dtype = dtype or cast
    cast_args = [
        a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    ]
    with torch.autocast(x.device.type, enabled=False):
        return fn(x.to(dtype), *cast_args)


class _Linear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ weight if need_x else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(0) if ctx.has_bias and need_b else None
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, dx, dweight, dbias):
        x, weight = ctx.saved_tensors
        with _rule_context():
            out = None if dx is None else F.linear(dx, weight)
            out = _add(out, None if dweight is None else F.linear(x, dweight))
            out = _add(out, dbias)
            if out is None:
                return x.new_zeros(*x.shape[:-1], weight.shape[0])
            return out.expand(*x.shape[:-1], weight.shape[0])


class _Conv(torch.autograd.Function):
    """N-d convolution (1, 2 or 3 spatial dims, zero padding given as sizes)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        x, weight, bias, *ctx.geometry = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.out_shape = output.shape

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 7
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        n = weight.dim() - 2
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.bias_shape is not None and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            ctx.bias_shape,
            _expand(stride, n),
            _expand(padding, n),
            _expand(dilation, n),
            False,
            [0] * n,
            groups,
            mask,
        )
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        geometry = ctx.geometry
        conv = _CONV[weight.dim() - 2]
        with _rule_context():
            out = None if dx is None else conv(dx, weight, None, *geometry)
            if dweight is not None:
                out = _add(out, conv(x, dweight, None, *geometry))
            if dbias is not None:
                out = _add(out, dbias.reshape((1, -1) + (1,) * (weight.dim() - 2)))
            return x.new_zeros(ctx.out_shape) if out is None else out.expand(ctx.out_shape)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _expand(value, n: int) -> list[int]:
    """A convolution's stride / padding / dilation as a list of ``n`` ints."""
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


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


class _Pointwise(torch.autograd.Function):
    """``f(x)`` for an elementwise ``f`` given by its forward and backward ATen ops; the JVP is
    the backward kernel applied to the tangent (a diagonal Jacobian)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, name, approximate):
        return _POINTWISE[name][0](x, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        x, ctx.name, ctx.approximate = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        (x,) = ctx.saved_tensors
        return _POINTWISE[ctx.name][1](grad, x, ctx.approximate), None, None

    @staticmethod
    def jvp(ctx, dx, _name, _approximate):
        (x,) = ctx.saved_tensors
        with _rule_context():
            return _POINTWISE[ctx.name][1](dx, x, ctx.approximate)


_POINTWISE = {
    "silu": (lambda x, _: F.silu(x), lambda g, x, _: torch.ops.aten.silu_backward(g, x)),
    "gelu": (
        lambda x, a: F.gelu(x, approximate=a),
        lambda g, x, a: torch.ops.aten.gelu_backward(g, x, approximate=a),
    ),
}


def silu(x: torch.Tensor) -> torch.Tensor:
    """``F.silu`` with the lean forward-mode rule inside forward-mode transforms."""
    return _Pointwise.apply(x, "silu", "none") if lean_rules_active() else F.silu(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` with the lean forward-mode rule inside forward-mode transforms."""
    if lean_rules_active():
        return _Pointwise.apply(x, "gelu", approximate)
    return F.gelu(x, approximate=approximate)
