"""``torch.nn`` layers whose forward uses the lean rules of :mod:`.rules` inside forward-mode
transforms (same parameters, state-dict keys and numbers as the ``torch.nn`` layer they
subclass; outside a transform they are exactly that layer)."""

from __future__ import annotations

import torch
from torch import nn

from .norm_rules import _GroupNorm, _LayerNorm
from .rules import _call, _Conv, _Linear, gelu, lean_rules_active, silu

__all__ = ["Linear", "Conv2d", "GroupNorm", "LayerNorm", "SiLU", "GELU"]


class Linear(nn.Linear):
    """``torch.nn.Linear`` with a forward-mode rule that skips the weights' zero tangent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not lean_rules_active():
            return super().forward(x)
        return _call(_Linear.apply, x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with a forward-mode rule that skips the weights' zero tangent
    (zero padding with explicit sizes; other settings fall back to ``nn.Conv2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not lean_rules_active() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return _call(
            _Conv.apply,
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


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


class SiLU(nn.SiLU):
    """``torch.nn.SiLU`` with the lean forward-mode rule (:func:`silu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


class GELU(nn.GELU):
    """``torch.nn.GELU`` with the lean forward-mode rule (:func:`gelu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)
