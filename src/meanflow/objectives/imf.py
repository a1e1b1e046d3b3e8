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
scale and interval as network inputs (:class:`GuidanceInputs`, ``--set guidance.inputs=true``)
the scale is chosen at sampling time, still in one evaluation.
"""

from __future__ import annotations

import torch

from ..errors import check
from ..flow.jvp import at_least_float32
from ..flow.path import PathSample, broadcast_time
from ..flow.times import TimeSampler
from .guidance import Guidance, guidance_attribute, guidance_from, set_guidance_attribute
from .meanflow import MeanFlow
from .rows import Conditioned, Draws, evaluation_mode, rows_first


class ImprovedMeanFlow(MeanFlow):
    """iMF (module docstring); arguments as :class:`MeanFlow` (``guidance`` included). One
    extra no-grad network evaluation per r != t row (``v_hat``)."""

    def tangent(self, model, z, r, t, v, y) -> torch.Tensor:
        """``v_hat = sg(u(z, t, t | y))``, the network's velocity at ``z``, in eval mode (with
        guidance inputs, at the row's guidance scale: :meth:`GuidanceInputs.velocity_model`)."""
        net = model if self.guidance is None else self.guidance.velocity_model(model, t)
        with torch.no_grad(), evaluation_mode(net):
            return at_least_float32(net(z, t, t, y=y)).to(v.dtype)


class GuidanceInputs(Guidance):
    """Guidance with its scale and interval as *network inputs* (the authors' iMF recipe), so
    the scale is chosen at sampling time in one evaluation. The network takes
    ``guidance=(omega, t_min, t_max)`` (B, 3) (built with ``guidance_inputs=True``); an
    objective holds it as any guidance: ``ImprovedMeanFlow(guidance=GuidanceInputs(10))``.

    Per row: ``omega = omega_max ** U(0, 1)`` (log-uniform on [1, omega_max]; the authors'
    power law with beta = 1 and omega_max = 8), ``t_min ~ U(0, 0.5)``, ``t_max ~ U(0.5, 1)``,
    and ``[0, 1]`` on r = t rows. With ``w = omega`` inside the row's interval and 1 outside,

        v~ = v + (1 - 1/w) (u(z, t, t | y, w, 0, 1) - u(z, t, t | null, 1, 0, 1)),

    both terms stop-gradients in eval mode, ``v~ = v`` on label-dropped rows; the network is
    trained as ``u(z, r, t | y, omega, t_min, t_max)`` on it. At the fixed point
    ``u(z, t, t | y, w) = w v_cond + (1 - w) v_uncond``: ordinary CFG of scale w. iMF's
    tangent is ``u(z, t, t | y, w, 0, 1)``, the network's guided velocity. Label dropout as
    :class:`Guidance`; its ``omega``, ``kappa``, ``t_min``, ``t_max`` are not used."""

    def __init__(
        self,
        num_classes: int,
        *,
        omega_max: float = 8.0,
        label_dropout: float = 0.1,
        drop_rows: str = "r=t",
    ) -> None:
        super().__init__(num_classes, label_dropout=label_dropout, drop_rows=drop_rows)
        check(omega_max >= 1, f"guidance omega_max must be >= 1, got {omega_max}")
        self.omega_max = float(omega_max)

    def arguments(self) -> dict:
        return dict(
            omega_max=self.omega_max, label_dropout=self.label_dropout, drop_rows=self.drop_rows
        )

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

    def draw(self, n, generator, device, rest) -> Draws:
        """As :meth:`Guidance.draw`, then the rows' guidance inputs."""
        draws = super().draw(n, generator, device, rest)
        draws.guide = self.draw_guidance(draws.r, draws.t, generator)
        return draws

    def prepare(self, objective: MeanFlow, x, y, noise, r, t, generator, drop, guide, cond):
        """As :meth:`Guidance.prepare`; ``guide``: the rows' ``(omega, t_min, t_max)`` from
        :meth:`draw` (drawn here after the other inputs when absent), passed to the network as
        ``guidance=`` in ``cond``."""
        if noise is None and r is None and t is None and drop is None and guide is None:
            d = objective.draw(
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
        y, noise, r, t = self.dropped_labels(objective, x, y, noise, r, t, generator, drop)
        return y, noise, r, t, {**(cond or {}), "guidance": guide}

    @staticmethod
    def _scale(model, t):
        """The rows' guidance scale ``w``: omega inside their interval, 1 outside."""
        omega, t_min, t_max = model.cond["guidance"].unbind(1)
        return torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))

    def velocity(self, model, path: PathSample, t, y):
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
        with torch.no_grad(), evaluation_mode(model):
            cond_u, uncond_u = both(torch.cat([z, z]), tt, tt, y=torch.cat([yi, null])).chunk(2)
        scale = broadcast_time((1 - 1 / wi).to(out.dtype), out[idx])
        out[idx] = out[idx] + scale * (cond_u.to(out.dtype) - uncond_u.to(out.dtype))
        return out

    def velocity_model(self, model, t):
        """``u(z, t, t | y, w, 0, 1)``: the network at the row's guidance scale ``w``."""
        return Conditioned(model.net, {**model.cond, "guidance": _unit(self._scale(model, t))})


def _unit(w: torch.Tensor) -> torch.Tensor:
    """``(w, 0, 1)`` rows: scale ``w`` over the whole interval."""
    return torch.stack([w, torch.zeros_like(w), torch.ones_like(w)], 1)


class GuidedImprovedMeanFlow(ImprovedMeanFlow):
    """iMF with classifier-free guidance folded into ``v~``: ``ImprovedMeanFlow(time_sampler,
    guidance=Guidance(num_classes, ...))`` under its earlier name; keywords as
    :class:`meanflow.objectives.guidance.GuidedMeanFlow`. ``v_hat`` uses the row's label (the
    null label on dropped rows)."""

    def __init__(
        self, num_classes: int, time_sampler: TimeSampler | None = None, **options
    ) -> None:
        guidance = guidance_from(num_classes, options)
        super().__init__(time_sampler, guidance=guidance, **options)

    __getattr__ = guidance_attribute
    __setattr__ = set_guidance_attribute


class GuidanceInputsIMF(ImprovedMeanFlow):
    """iMF with guidance inputs: ``ImprovedMeanFlow(time_sampler,
    guidance=GuidanceInputs(num_classes, omega_max=..., label_dropout=..., drop_rows=...))``
    under its earlier name; ``omega``, ``kappa``, ``t_min``, ``t_max`` are accepted and not
    used, the other keywords go to :class:`MeanFlow`."""

    def __init__(
        self,
        num_classes: int,
        time_sampler: TimeSampler | None = None,
        *,
        omega_max: float = 8.0,
        label_dropout: float = 0.1,
        drop_rows: str = "r=t",
        **options,
    ) -> None:
        for unused in ("omega", "kappa", "t_min", "t_max"):
            options.pop(unused, None)
        guidance = GuidanceInputs(
            num_classes, omega_max=omega_max, label_dropout=label_dropout, drop_rows=drop_rows
        )
        super().__init__(time_sampler, guidance=guidance, **options)

    __getattr__ = guidance_attribute
    __setattr__ = set_guidance_attribute


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
