"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows: On the
Challenges of Fastforward Generative Models", arXiv 2512.02012), the loss on the velocity.

iMF regresses the *compound velocity* ``V = u(z, r, t) + (t - r) sg(du/dt)`` on the (guided)
velocity ``v~``:

    L = ||V - v~||^2 = ||u - (v~ - (t - r) sg(du/dt))||^2,

the same value and gradient as MeanFlow's loss with target ``sg(v~ - (t - r) du/dt)``, with one
change: ``du/dt`` is the JVP along ``(v_hat, 0, 1)``, where ``v_hat`` is the network's own
prediction of the velocity at ``z`` (a stop-gradient), not the conditional ``v = e - x``. Since
``dz/dt`` of the flow that ``u`` averages is the marginal velocity ``E[v | z]``, ``v_hat``
estimates the right tangent, where ``v`` is one noisy sample of it; the target then depends on
the data only through ``v~``, the "more standard regression" of the paper.

``v_hat`` here is the parameter-free variant: ``u(z, t, t | y)`` (the average velocity over an
empty interval is the instantaneous one), evaluated without graph and in eval mode, as the
guidance terms. The authors' default is an auxiliary velocity head trained with a second loss;
the r = t rows train ``u(z, t, t)`` on ``v~`` here, which is that loss for this variant.
Adaptive weighting as MeanFlow's (the authors: ``p = 1``, ``c = 0.01``). With the guidance
scale and interval as network inputs (:class:`GuidanceInputsIMF`, ``--set guidance.inputs=true``)
the scale is chosen at sampling time, still in one evaluation.
"""

from __future__ import annotations

import torch

from ..errors import check
from ..flow.jvp import at_least_float32
from ..flow.path import broadcast_time
from .guidance import GuidedMeanFlow, _evaluation_mode
from .meanflow import Conditioned, Draws, MeanFlow, rows_first


class ImprovedMeanFlow(MeanFlow):
    """iMF (module docstring); arguments as :class:`MeanFlow`. One extra no-grad network
    evaluation per r != t row (``v_hat``)."""

    def tangent(self, model, z, r, t, v, y) -> torch.Tensor:
        """``v_hat = sg(u(z, t, t | y))``, the network's velocity at ``z``, in eval mode."""
        with torch.no_grad(), _evaluation_mode(model):
            return at_least_float32(model(z, t, t, y=y)).to(v.dtype)


class GuidedImprovedMeanFlow(ImprovedMeanFlow, GuidedMeanFlow):
    """iMF with classifier-free guidance folded into ``v~`` (:class:`GuidedMeanFlow`'s omega,
    kappa, interval and label dropout); ``v_hat`` uses the row's label (the null label on
    dropped rows)."""


class GuidanceInputsIMF(GuidedImprovedMeanFlow):
    """iMF with the guidance scale and interval as *network inputs* (the authors' recipe), so
    the scale is chosen at sampling time in one evaluation. The network takes
    ``guidance=(omega, t_min, t_max)`` (B, 3) (built with ``guidance_inputs=True``).

    Per row: ``omega = omega_max ** U(0, 1)`` (log-uniform on [1, omega_max]; the authors'
    power law with beta = 1 and omega_max = 8), ``t_min ~ U(0, 0.5)``, ``t_max ~ U(0.5, 1)``,
    and ``[0, 1]`` on r = t rows. With ``w = omega`` inside the row's interval and 1 outside,

        v~ = v + (1 - 1/w) (u(z, t, t | y, w, 0, 1) - u(z, t, t | null, 1, 0, 1)),

    both terms stop-gradients in eval mode, ``v~ = v`` on label-dropped rows; the network is
    trained as ``u(z, r, t | y, omega, t_min, t_max)`` on it. At the fixed point
    ``u(z, t, t | y, w) = w v_cond + (1 - w) v_uncond``: ordinary CFG of scale w. The JVP's
    tangent is ``u(z, t, t | y, w, 0, 1)``, the network's guided velocity. ``omega``,
    ``kappa``, ``t_min``, ``t_max`` of :class:`GuidedMeanFlow` are not used."""

    def __init__(
        self, num_classes: int, time_sampler=None, *, omega_max: float = 8.0, **kwargs
    ) -> None:
        for unused in ("omega", "kappa", "t_min", "t_max"):
            kwargs.pop(unused, None)
        super().__init__(num_classes, time_sampler, **kwargs)
        check(omega_max >= 1, f"guidance omega_max must be >= 1, got {omega_max}")
        self.omega_max = float(omega_max)

    @property
    def guided(self) -> bool:
        return True

    def draw_guidance(self, r: torch.Tensor, t: torch.Tensor, generator) -> torch.Tensor:
        """Each row's ``(omega, t_min, t_max)`` (class docstring)."""
        u = torch.rand(3, r.shape[0], generator=generator, device=r.device)
        omega = self.omega_max ** u[0]
        flat = r == t
        t_min = torch.where(flat, 0.0, 0.5 * u[1])
        t_max = torch.where(flat, 1.0, 0.5 + 0.5 * u[2])
        return torch.stack([omega, t_min, t_max], 1)

    def draw(self, n, shape, *, generator=None, device="cpu", dtype=torch.float32) -> Draws:
        draws = super().draw(n, shape, generator=generator, device=device, dtype=dtype)
        draws.guide = self.draw_guidance(draws.r, draws.t, generator)
        return draws

    def __call__(
        self,
        model,
        x,
        y=None,
        *,
        noise=None,
        r=None,
        t=None,
        generator=None,
        drop=None,
        guide=None,
        cond=None,
    ):
        """As :class:`GuidedMeanFlow`; ``guide``: the rows' ``(omega, t_min, t_max)`` from
        :meth:`draw` (drawn here after the other inputs when absent)."""
        if noise is None and r is None and t is None and drop is None and guide is None:
            d = self.draw(
                x.shape[0], tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype
            )
            noise, r, t, drop, guide = d.noise, d.r, d.t, d.drop, d.guide
        check(r is not None, "pass r and t (with drop and guide) or none of the draws")
        if guide is None:
            guide = self.draw_guidance(r, t, generator)
        check(
            tuple(guide.shape) == (x.shape[0], 3),
            f"guide must have shape ({x.shape[0]}, 3) "
            f"= (omega, t_min, t_max), got {tuple(guide.shape)}",
        )
        return super().__call__(
            model,
            x,
            y,
            noise=noise,
            r=r,
            t=t,
            generator=generator,
            drop=drop,
            cond={**(cond or {}), "guidance": guide},
        )

    @staticmethod
    def _scale(model, t):
        """The rows' guidance scale ``w``: omega inside their interval, 1 outside."""
        omega, t_min, t_max = model.cond["guidance"].unbind(1)
        return torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))

    def velocity(self, model, path, r, t, y):
        """``v~`` of the class docstring (``y`` is already dropped)."""
        v = path.v
        w = self._scale(model, t)
        count, order = rows_first((w != 1) & (y != self.num_classes))
        if count == 0:
            return v
        idx = order[:count]
        z, ti, wi, yi = path.z[idx], t[idx], w[idx], y[idx]
        null = torch.full_like(yi, self.num_classes)
        twice = {k: torch.cat([a[idx], a[idx]]) for k, a in model.cond.items()}
        twice["guidance"] = torch.cat([_unit(wi), _unit(torch.ones_like(wi))])
        both = Conditioned(model.net, twice)  # the conditional and the unconditional rows
        tt = torch.cat([ti, ti])
        out = at_least_float32(v).clone()
        with torch.no_grad(), _evaluation_mode(model):
            cond_u, uncond_u = both(torch.cat([z, z]), tt, tt, y=torch.cat([yi, null])).chunk(2)
        scale = broadcast_time((1 - 1 / wi).to(out.dtype), out[idx])
        out[idx] = out[idx] + scale * (cond_u.to(out.dtype) - uncond_u.to(out.dtype))
        return out

    def tangent(self, model, z, r, t, v, y) -> torch.Tensor:
        """``sg(u(z, t, t | y, w, 0, 1))``: the network's guided velocity, in eval mode."""
        sub = Conditioned(model.net, {**model.cond, "guidance": _unit(self._scale(model, t))})
        with torch.no_grad(), _evaluation_mode(model):
            return at_least_float32(sub(z, t, t, y=y)).to(v.dtype)


def _unit(w: torch.Tensor) -> torch.Tensor:
    """``(w, 0, 1)`` rows: scale ``w`` over the whole interval."""
    return torch.stack([w, torch.zeros_like(w), torch.ones_like(w)], 1)


def with_guidance(model, omega: float, t_min: float = 0.0, t_max: float = 1.0):
    """``model`` of a :class:`GuidanceInputsIMF` run at guidance scale ``omega`` over
    ``[t_min, t_max]``: one evaluation per step, ``u(z, r, t | y, omega, t_min, t_max)``."""
    check(omega >= 1, f"guidance scale must be >= 1 for a model with guidance inputs, got {omega}")
    check(
        0 <= t_min <= t_max <= 1,
        f"guidance interval must satisfy 0 <= t_min <= t_max <= 1, got [{t_min}, {t_max}]",
    )

    def guided(z, r, t, y=None):
        g = torch.tensor([omega, t_min, t_max], device=z.device, dtype=z.dtype)
        return model(z, r, t, y=y, guidance=g.expand(z.shape[0], 3))

    return guided
