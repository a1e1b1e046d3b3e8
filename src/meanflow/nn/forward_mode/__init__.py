"""Lean forward-mode (JVP) rules for Linear, Conv1d/2d/3d, GroupNorm, LayerNorm, RMSNorm, SiLU,
GELU (and attention, :mod:`meanflow.nn.attention`), as layers and for any network.

MeanFlow differentiates the network along ``(v, 0, 1)`` in every step; the weights carry no
tangent. PyTorch's built-in forward-mode formulas still treat a weight's missing tangent as a
zero tensor and pay for it: for ``y = x W^T + b`` and ``y = conv(x, W) + b`` they compute

    dy = dx W^T + x dW^T (+ db)        (three matrix products / convolutions per layer, not two)

with ``dW = 0`` materialised; the normalisations' formulas expand into dozens of small ops with
dtype copies, and under autograd SiLU's expands into sigmoid and products that it records for
double backward. These layers are drop-in subclasses of the ``torch.nn`` ones (same
parameters, state-dict keys and forward numbers) whose ops are ``torch.autograd.Function`` s
with these rules (:mod:`.rules`; the layers in :mod:`.layers`), each term present only when
its tangent is:

    Linear / Conv:   dy = A(dx; W) + A(x; dW) + db          (A = the layer's linear map)
    GroupNorm / LayerNorm, with x_hat = (x - mean) * rstd over each group (or the last dims):
        dy = gamma * rstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)) + x_hat * dgamma + dbeta
    RMSNorm, with x_hat = x * rstd:
        dy = gamma * rstd * (dx - x_hat * mean(x_hat * dx)) + x_hat * dgamma
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

Any network: inside :func:`meanflow.flow.jvp.total_derivative` the exact back-ends run the model
under :func:`.routing.route_standard_layers`, which sends the functional calls of standard
``torch.nn`` layers (``F.linear``, ``F.conv1d/2d/3d``, ``F.group_norm``, ``F.layer_norm``,
``F.rms_norm``, ``F.silu``, ``F.gelu``, ``F.scaled_dot_product_attention``) to these rules while
tangents are live, so a user's plain PyTorch module gets them without changes (import it from
``meanflow.nn.forward_mode.routing``; it is not imported here, since it needs attention).
"""

from .layers import GELU, Conv2d, GroupNorm, LayerNorm, Linear, SiLU
from .rules import (
    gelu,
    in_forward_transform,
    lean_rules_active,
    silu,
    tangents_without_graph,
    torch_rules,
    torch_rules_enabled,
)

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
    "torch_rules_enabled",
]
