"""The lean forward-mode rules as ``torch.autograd.Function`` s, and the switches that turn them
on (inside a forward-mode transform) and off (:func:`torch_rules`).

Each rule's ``jvp`` computes only the terms whose tangent is present (package docstring); its
``backward`` calls the ATen kernels autograd would (``convolution_backward``, matrix products
for linear). The normalisation layers' rules live in :mod:`.norm_rules`.
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
