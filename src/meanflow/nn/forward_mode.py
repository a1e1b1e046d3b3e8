"""Linear, Conv2d, GroupNorm, LayerNorm, SiLU and GELU with lean forward-mode (JVP) rules.

MeanFlow differentiates the network along ``(v, 0, 1)`` in every step; the weights carry no
tangent. PyTorch's built-in forward-mode formulas still treat a weight's missing tangent as a
zero tensor and pay for it: for ``y = x W^T + b`` and ``y = conv(x, W) + b`` they compute

    dy = dx W^T + x dW^T (+ db)        (three matrix products / convolutions per layer, not two)

with ``dW = 0`` materialised; the normalisations' formulas expand into dozens of small ops with
dtype copies, and under autograd SiLU's expands into sigmoid and products that it records for
double backward. These layers are drop-in subclasses of the ``torch.nn`` ones (same
parameters, state-dict keys and forward numbers) whose ops are ``torch.autograd.Function`` s
with these rules, each term present only when its tangent is:

    Linear / Conv2d:   dy = A(dx; W) + A(x; dW) + db          (A = the layer's linear map)
    GroupNorm / LayerNorm, with x_hat = (x - mean) * rstd over each group (or the last dims):
        dy = gamma * rstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)) + x_hat * dgamma + dbeta
    SiLU / GELU (elementwise f):   dy = f'(x) * dx

The norms' bracket is the Jacobian of the unit-affine normalisation applied to dx; it is
symmetric, so the norm's fused backward kernel computes it with dx as the cotangent (one kernel
instead of ten elementwise passes). The activations' Jacobian is diagonal, so their backward
kernel applied to dx is the tangent.

The rules are used only while :func:`lean_rules_active`: inside a forward-mode transform (a
``forward_ad.dual_level`` or a ``torch.func`` transform) and not under :func:`torch_rules`
(which turns them off, for comparisons). Elsewhere the layers are exactly torch.nn's, so plain
forwards and backwards pay no Python ``autograd.Function`` overhead (about 3% of a small CPU
U-Net's step). Inside a transform their
backward passes call the same ATen kernels as autograd's (``convolution_backward``,
``native_group_norm_backward``, ``native_layer_norm_backward``; matrix products for Linear),
and under autocast the layers cast as autocast does (Linear and Conv2d to the autocast dtype)
except that the norms run in float32 (as CUDA's autocast does; CPU's keeps bf16), with their
op under autocast off.

Inside :func:`meanflow.flow.jvp.total_derivative` (which detaches ``du/dt``) the rules run under
``torch.no_grad()`` (:func:`tangents_without_graph`), so the tangent computation records no
autograd graph when the primal keeps one for the loss; elsewhere tangents stay differentiable.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD

__all__ = [
    "Linear",
    "Conv2d",
    "GroupNorm",
    "LayerNorm",
    "SiLU",
    "GELU",
    "silu",
    "gelu",
    "in_forward_transform",
    "lean_rules_active",
    "tangents_without_graph",
    "torch_rules",
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


class Linear(nn.Linear):
    """``torch.nn.Linear`` with a forward-mode rule that skips the weights' zero tangent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not lean_rules_active():
            return super().forward(x)
        return _call(_Linear.apply, x, self.weight, self.bias)


class _Conv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

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
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.bias_shape is not None and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups, mask
        )
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        with _rule_context():
            out = (
                None
                if dx is None
                else F.conv2d(dx, weight, None, stride, padding, dilation, groups)
            )
            if dweight is not None:
                out = _add(out, F.conv2d(x, dweight, None, stride, padding, dilation, groups))
            if dbias is not None:
                out = _add(out, dbias.reshape(1, -1, 1, 1))
            return x.new_zeros(ctx.out_shape) if out is None else out.expand(ctx.out_shape)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with a forward-mode rule that skips the weights' zero tangent
    (zero padding with explicit sizes; other settings fall back to ``nn.Conv2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not lean_rules_active() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return _call(
            _Conv2d.apply,
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


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


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with a lean forward-mode rule (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not lean_rules_active():
            return super().forward(x)
        return _call(
            lambda x_, w, b: _GroupNorm.apply(x_, self.num_groups, w, b, self.eps)[0],
            x,
            self.weight,
            self.bias,
            dtype=torch.float32,
        )


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


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` with a lean forward-mode rule (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not lean_rules_active():
            return super().forward(x)
        shape = list(self.normalized_shape)
        return _call(
            lambda x_, w, b: _LayerNorm.apply(x_, shape, w, b, self.eps)[0],
            x,
            self.weight,
            self.bias,
            dtype=torch.float32,
        )


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


class SiLU(nn.SiLU):
    """``torch.nn.SiLU`` with the lean forward-mode rule (:func:`silu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


class GELU(nn.GELU):
    """``torch.nn.GELU`` with the lean forward-mode rule (:func:`gelu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)
