"""Forward-mode helpers: the total derivative du/dt of a network along the path.

For ``u = model(z, r, t, y)`` the MeanFlow identity needs the total derivative

    du/dt = v . d_z u + 0 . d_r u + 1 . d_t u,

one Jacobian-vector product with tangent ``(v, 0, 1)`` on ``(z, r, t)`` (paper Eq. 8).
It runs in float32 with autocast disabled (bf16 in the JVP is a known source of late NaNs) and
with PyTorch's math attention backend, because the flash and memory-efficient kernels have no
forward-mode derivative. The primal output keeps its autograd graph, so the loss can be taken
on it without a second forward pass.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def at_least_float32(a: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32; float32 and float64 pass unchanged."""
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def total_derivative(model, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                     v: torch.Tensor, y: torch.Tensor | None = None, *,
                     autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(u, du/dt)``: the network output (differentiable) and its total derivative
    along tangent ``(v, 0, 1)`` (detached), both in at least float32. ``autocast=True`` keeps
    the surrounding autocast (e.g. bf16) inside the JVP instead of float32."""
    z, r, t, v = (at_least_float32(a) for a in (z, r, t, v))

    def fn(z_, r_, t_):
        return model(z_, r_, t_, y=y)

    with ExitStack() as stack:
        if not autocast:
            stack.enter_context(torch.autocast(device_type=z.device.type, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        u, dudt = torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return at_least_float32(u), at_least_float32(dudt.detach())
