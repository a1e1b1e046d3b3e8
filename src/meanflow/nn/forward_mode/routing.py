"""The lean rules for any network: route the standard functional calls of a user's module to
them while tangents are live.

:func:`route_standard_layers` enters a ``torch.overrides.TorchFunctionMode`` that looks at each
call of

    F.linear, F.conv1d / conv2d / conv3d, F.group_norm, F.layer_norm, F.rms_norm, F.silu,
    F.gelu, F.scaled_dot_product_attention

(what ``torch.nn.Linear``, ``Conv1d/2d/3d``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``,
``SiLU``, ``GELU`` and attention blocks call) and, when one of its tensor arguments carries a
tangent (a ``forward_ad`` dual tensor at the current level, or any call inside a ``torch.func``
transform) and :func:`.rules.lean_rules_active`, computes it with the matching lean rule of
:mod:`.rules` (for attention, :func:`meanflow.nn.attention.attention`). Everything else, a call
without tangents, and a call with settings a rule does not cover (string padding other than
``"valid"``, in-place activations, attention with a mask, dropout, causal masking or grouped
keys, an unbatched convolution) goes to PyTorch unchanged, so it takes PyTorch's own
forward-mode formula: never a wrong rule, at worst the slower one.

``F.embedding`` needs no rule: its weight carries no tangent and its indices are integers, so
PyTorch's own rule already computes nothing.

The project's own layers (:mod:`.layers`) call the rules directly; the calls inside a rule see
tensors without tangents (forward-AD) or are hidden from the mode (``torch.func``), so nothing
is handled twice. The mode is entered by :func:`meanflow.flow.jvp.total_derivative` around the
network call of the exact back-ends, unless :func:`routing_needed` says the network is built
from the project's layers only (the mode's Python hook on every op costs 3-5% of a step of the
project's U-Net and DiT on CPU, for nothing there).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.overrides import TorchFunctionMode

from ..attention import attention
from .norm_rules import _GroupNorm, _LayerNorm, _RMSNorm
from .rules import _call, _Conv, _expand, _Linear, _Pointwise, lean_rules_active

__all__ = ["route_standard_layers", "routing_needed", "ROUTED"]

_FALLBACK = object()  # a rule's answer: "not mine, let PyTorch compute it"


def _live(*tensors) -> bool:
    """Whether a tangent may ride on one of ``tensors``: any call inside a ``torch.func``
    transform, or a dual tensor of the current ``forward_ad`` level."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if fwAD._current_level < 0:
        return False
    return any(
        isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in tensors
    )


def _linear(input, weight, bias=None):
    if weight.dim() != 2 or not _live(input, weight, bias):
        return _FALLBACK
    return _call(_Linear.apply, input, weight, bias)


def _conv_rule(n: int):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        padding = 0 if padding == "valid" else padding
        if isinstance(padding, str) or input.dim() != n + 2 or not _live(input, weight, bias):
            return _FALLBACK
        geometry = (_expand(stride, n), _expand(padding, n), _expand(dilation, n), groups)
        return _call(_Conv.apply, input, weight, bias, *geometry)

    return conv


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    if input.dim() < 2 or not _live(input, weight, bias):
        return _FALLBACK
    return _call(
        lambda x, w, b: _GroupNorm.apply(x, num_groups, w, b, eps)[0],
        input,
        weight,
        bias,
        dtype=torch.float32,
    )


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if not _live(input, weight, bias):
        return _FALLBACK
    shape = list(normalized_shape)
    return _call(
        lambda x, w, b: _LayerNorm.apply(x, shape, w, b, eps)[0],
        input,
        weight,
        bias,
        dtype=torch.float32,
    )


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    if not _live(input, weight):
        return _FALLBACK
    shape = list(normalized_shape)

    def rule(x, w):
        return _RMSNorm.apply(x, shape, w, torch.finfo(x.dtype).eps if eps is None else eps)[0]

    return _call(rule, input, weight, dtype=torch.float32)


def _silu(input, inplace=False):
    if inplace or not _live(input):
        return _FALLBACK
    return _Pointwise.apply(input, "silu", "none")


def _gelu(input, approximate="none"):
    if not _live(input):
        return _FALLBACK
    return _Pointwise.apply(input, "gelu", approximate)


def _sdpa(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    plain = attn_mask is None and dropout_p == 0.0 and not is_causal and not enable_gqa
    if (
        not plain
        or query.dim() < 3
        or query.shape[:-2] != key.shape[:-2]
        or key.shape[:-1] != value.shape[:-1]
        or not _live(query, key, value)
    ):
        return _FALLBACK
    if scale is not None and math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-12):
        scale = None
    return attention(query, key, value, scale=scale)


_RULES = {
    F.linear: _linear,
    F.conv1d: _conv_rule(1),
    F.conv2d: _conv_rule(2),
    F.conv3d: _conv_rule(3),
    F.group_norm: _group_norm,
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    F.silu: _silu,
    F.gelu: _gelu,
    F.scaled_dot_product_attention: _sdpa,
}

#: the functional calls that take a lean rule while tangents are live.
ROUTED = tuple(f"F.{f.__name__}" for f in _RULES)


#: torch.nn modules that call none of the routed functions (containers, lookups, dropout).
_INERT = (
    torch.nn.Sequential,
    torch.nn.ModuleList,
    torch.nn.ModuleDict,
    torch.nn.ParameterList,
    torch.nn.ParameterDict,
    torch.nn.Identity,
    torch.nn.Embedding,
    torch.nn.Dropout,
    torch.nn.Flatten,
    torch.nn.Unflatten,
)


def routing_needed(model) -> bool:
    """Whether ``model`` may call standard layers that only the routing makes lean: False only
    for an ``nn.Module`` whose modules are all the project's own (``meanflow.*`` classes, which
    call the rules themselves) or :data:`_INERT` ``torch.nn`` ones; True for anything else,
    including a function or a wrapper of a user's class."""
    if not isinstance(model, torch.nn.Module):
        return True
    return not all(
        type(m).__module__.startswith("meanflow.") or type(m) in _INERT for m in model.modules()
    )


class _LeanRouting(TorchFunctionMode):
    """Sends the calls of :data:`ROUTED` to their lean rules (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None and lean_rules_active():
            out = rule(*args, **kwargs)
            if out is not _FALLBACK:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def route_standard_layers():
    """Inside this context, standard ``torch.nn`` layers and functional calls of any module use
    the lean forward-mode rules wherever tangents are live (module docstring); nests."""
    with _LeanRouting():
        yield
