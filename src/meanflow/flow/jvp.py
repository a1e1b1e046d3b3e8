"""Forward-mode helpers: the total derivative du/dt of a network along the path.

For ``u = model(z, r, t, y)`` the MeanFlow identity needs the total derivative

    du/dt = v . d_z u + 0 . d_r u + 1 . d_t u,

one Jacobian-vector product with tangent ``(v, 0, 1)`` on ``(z, r, t)`` (paper Eq. 8).
It runs in float32 with autocast disabled (bf16 in the JVP is a known source of late NaNs) and,
for the exact back-ends, with PyTorch's math attention backend, because the flash and
memory-efficient kernels have no forward-mode derivative. The primal output keeps its autograd
graph, so the loss can be taken on it without a second forward pass; the layers of
:mod:`meanflow.nn.forward_mode` compute the tangent without recording a graph
(``tangents_without_graph``), since ``du/dt`` is returned detached.

Back-ends (``backend=``; docs/method.md, "JVP back-ends"):

* ``"forward-ad"`` (default): ``torch.autograd.forward_ad`` dual tensors (exact; about 2
  forward passes of cost with the layers of :mod:`meanflow.nn.forward_mode`).
* ``"func"``: ``torch.func.jvp`` (exact; the same numbers; each op pays functorch's wrapping,
  measurably slower on small CPU networks).

Without graph (under ``torch.no_grad()``, as ``loss.jvp=detached`` computes its targets), a
network that offers ``tangent_forward(z, r, t, y=y, dz=, dr=, dt=) -> (u, du)`` (the DiT, the
U-Net and the MLP: :mod:`meanflow.nn.tangent_pass`) computes the JVP itself in one pass of
(value, tangent) pairs, without forward-mode machinery, where :func:`rows_pass_available`;
``"forward-ad"`` uses it.

Both exact back-ends run the network under
:func:`meanflow.nn.forward_mode.routing.route_standard_layers` (unless it is built from the
project's layers only: ``routing_needed``), so standard ``torch.nn`` layers of any network
(Linear, Conv, norms, SiLU, GELU, SDPA) take the lean rules as well.
* ``"finite-difference"``: ``u = u(z, r, t)`` from one ordinary forward with graph, and with
  no graph, along ``(v, 0, 1)`` with step ``h``,

      forward:  du/dt ~ (u(z + s v, r, t + s) - u) / s,   s = h, or -h where t + h > 1;
      central:  du/dt ~ (u(z + a v, r, t + a) - u(z - b v, r, t - b)) / (a + b),
                a = min(h, 1 - t), b = min(h, t)  (symmetric, 2nd order, away from the ends).

  Default steps (measured in float32 against the exact JVP, docs/method.md): ``FD_STEP``.
  Each pass draws its own dropout masks, so the training loop refuses it with dropout.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import check
from ..nn.forward_mode import tangents_without_graph, torch_rules_enabled
from ..nn.forward_mode.routing import route_standard_layers, routing_needed
from .path import broadcast_time

JVP_BACKENDS = ("func", "forward-ad", "finite-difference")
FD_SCHEMES = ("forward", "central")
FD_STEP = {"forward": 1e-3, "central": 3e-3}


def at_least_float32(a: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32; float32 and float64 pass unchanged."""
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def total_derivative(
    model,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    autocast: bool = False,
    backend: str = "forward-ad",
    fd_step: float | None = None,
    fd_scheme: str = "forward",
    time_tangent: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(u, du/dt)``: the network output (differentiable) and its total derivative
    along tangent ``(v, 0, 1)`` (detached), both in at least float32. ``autocast=True`` keeps
    the surrounding autocast (e.g. bf16) inside the JVP instead of float32. ``backend``: one
    of ``JVP_BACKENDS``; ``fd_step`` (None: ``FD_STEP[fd_scheme]``) and ``fd_scheme`` are
    used by ``"finite-difference"`` only. ``time_tangent``: the tangent ``(dr, dt)`` on
    ``(r, t)``; the MeanFlow identity needs ``(0, 1)``, the others are the paper's ablation
    (Table 1b; exact back-ends only)."""
    check(
        backend in JVP_BACKENDS,
        f"JVP backend must be one of {', '.join(JVP_BACKENDS)}, got {backend!r}",
    )
    z, r, t, v = (at_least_float32(a) for a in (z, r, t, v))
    dr, dt = (float(a) for a in time_tangent)
    check(
        backend != "finite-difference" or (dr, dt) == (0.0, 1.0),
        "finite differences "
        "support the tangent (v, 0, 1) only; use an exact JVP back-end for the others",
    )

    def fn(z_, r_, t_):
        return model(z_, r_, t_, y=y)

    with ExitStack() as stack:
        if not autocast:
            stack.enter_context(torch.autocast(device_type=z.device.type, enabled=False))
        if backend == "finite-difference":
            u = fn(z, r, t)
            dudt = finite_difference(fn, z, r, t, v, u.detach(), fd_step, fd_scheme)
            return at_least_float32(u), at_least_float32(dudt)
        if not torch.is_grad_enabled() and rows_pass_available(model, z, backend):
            u, dudt = model.tangent_forward(
                z, r, t, y=y, dz=v, dr=torch.full_like(r, dr), dt=torch.full_like(t, dt)
            )
            return at_least_float32(u), at_least_float32(dudt)
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(tangents_without_graph())  # du/dt is detached below
        if routing_needed(model):  # lean rules for torch.nn layers of any network too
            stack.enter_context(route_standard_layers())
        if backend == "func":
            # torch.func.jvp's return type does not depend on has_aux (a 3-tuple only with it)
            u, dudt = torch.func.jvp(  # type: ignore[misc]
                fn, (z, r, t), (v, torch.full_like(r, dr), torch.full_like(t, dt))
            )
        else:
            with fwAD.dual_level():
                r_in = fwAD.make_dual(r, torch.full_like(r, dr)) if dr else r
                t_in = fwAD.make_dual(t, torch.full_like(t, dt)) if dt else t
                out = fn(fwAD.make_dual(z, v), r_in, t_in)
                u, dudt = fwAD.unpack_dual(out)
            check(
                dudt is not None,
                "the network's output carries no forward-mode tangent (a "
                "torch.compile-d module drops dual tensors): pass the module uncompiled (the "
                "trainer compiles with --set compile=true) or use jvp_backend=func",
            )
    return at_least_float32(u), at_least_float32(dudt.detach())


def rows_pass_available(model, z: torch.Tensor, backend: str = "forward-ad") -> bool:
    """Whether :func:`rows_derivative` applies: the exact ``"forward-ad"`` back-end, a network
    (not a compiled wrapper) with ``tangent_forward``, no autocast (the JVP runs in the input's
    float32 or float64, as :func:`total_derivative` runs it), no forward hooks (the pass
    calls layers' functions, not their modules, so hooks would not see it) and not under
    :func:`meanflow.nn.forward_mode.torch_rules` (which turns it off, for comparisons)."""
    return (
        backend == "forward-ad"
        and not torch_rules_enabled()
        and callable(getattr(model, "tangent_forward", None))
        and not hasattr(model, "_orig_mod")  # torch.compile's wrapper: keep its compiled forward
        and not torch.is_autocast_enabled(z.device.type)
        and z.dtype in (torch.float32, torch.float64)
        and not _has_forward_hooks(model)
    )


def _has_forward_hooks(model) -> bool:
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def rows_derivative(
    model,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | None,
    rows: torch.Tensor,
    time_tangent: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, du/dt)``: ``u = model(z, r, t, y)`` on every row (differentiable; the graph of an
    ordinary forward) and, for rows ``rows`` only, ``du/dt`` along ``(v, dr, dt)`` (``v`` holds
    those rows' tangents; detached), in one pass of the network's ``tangent_forward`` (where
    :func:`rows_pass_available`): no batch split, no dual tensors. The same numbers as
    :func:`total_derivative` on those rows and a plain forward on the others."""
    dr, dt = (float(a) for a in time_tangent)
    n = len(rows)
    u, dudt = model.tangent_forward(
        z, r, t, y, dz=v, dr=r.new_full((n,), dr), dt=t.new_full((n,), dt), rows=rows
    )
    return u, dudt.detach()


@torch.no_grad()
def finite_difference(fn, z, r, t, v, u, h, scheme):
    """``du/dt`` along ``(v, 0, 1)`` by a ``scheme`` ("forward" or "central") difference of
    step ``h`` (None: ``FD_STEP[scheme]``), given ``u = fn(z, r, t)`` (no graph)."""
    check(scheme in FD_SCHEMES, f"fd_scheme must be one of {', '.join(FD_SCHEMES)}, got {scheme!r}")
    h = FD_STEP[scheme] if h is None else h
    check(0 < h <= 0.5, f"fd_step must be in (0, 0.5], got {h}")
    if scheme == "forward":
        s = torch.where(t + h > 1, -h, h).to(t.dtype)
        return (fn(z + broadcast_time(s, z) * v, r, t + s) - u) / broadcast_time(s, u)
    a, b = (1 - t).clamp(max=h), t.clamp(max=h)
    plus = fn(z + broadcast_time(a, z) * v, r, t + a)
    minus = fn(z - broadcast_time(b, z) * v, r, t - b)
    return (plus - minus) / broadcast_time(a + b, u)
