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

Two estimates of ``v_hat``:

* the authors' (``aux_head=True``, the network built with ``model.aux_head=true``): an
  auxiliary velocity head ``v(z, r, t)``, a second output of the network
  (``model(z, r, t, y, aux=True) -> (u, v)``). The tangent is the v-head at ``(z, t, t)``
  (``h = 0``) at the row's guidance scale, without graph, in eval mode; the guidance terms of
  ``v~`` come from the v-head too; and the v-head output of the same forward as ``u`` gets its
  own adaptive-weighted loss (weight 1):

      L = ||V - v~||^2 / sg((||V - v~||^2 + c)^p) + ||v - v~||^2 / sg((||v - v~||^2 + c)^p).

  The JVP then runs on the whole batch (the authors' way; the ``jvp`` mode is not used),
  with the ``forward-ad`` or ``finite-difference`` back-end (``func`` is refused: its
  auxiliary output would need ``has_aux`` in :mod:`meanflow.flow.jvp`). Sampling calls the
  network without ``aux``: the v-head is not used.
* parameter-free (``aux_head=False``, the default): ``u(z, t, t | y)`` (the average velocity
  over an empty interval is the instantaneous one), evaluated without graph and in eval mode,
  as the guidance terms; the r = t rows train ``u(z, t, t)`` on ``v~``, which is the v-loss for
  this variant.

Adaptive weighting as MeanFlow's (the authors: ``p = 1``, ``c = 0.01``). With the guidance
scale and interval as network inputs (:class:`GuidanceInputs`, ``--set guidance.inputs=true``)
the scale is chosen at sampling time, still in one evaluation. docs/method.md, "iMF: ours vs
the authors'", lists what matches the official code (Lyy-iiis/imeanflow) and what differs.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch.autograd import forward_ad as fwAD

from ..errors import check
from ..flow.jvp import at_least_float32, finite_difference
from ..flow.path import PathSample, broadcast_time
from ..flow.times import TimeSampler
from .guidance import Guidance, guidance_attribute, guidance_from, set_guidance_attribute
from .meanflow import MeanFlow
from .rows import Conditioned, Draws, evaluation_mode, rows_first


class ImprovedMeanFlow(MeanFlow):
    """iMF (module docstring); arguments as :class:`MeanFlow` (``guidance`` included), and

    Args:
        aux_head: the authors' auxiliary velocity head (the network takes ``aux=True`` and
            returns ``(u, v)``): ``v_hat`` and the guidance terms from the v-head, plus its
            loss. False: the parameter-free ``v_hat = u(z, t, t)``.

    One extra no-grad network evaluation per r != t row (``v_hat``; with ``aux_head``, per
    row)."""

    def __init__(self, time_sampler: TimeSampler | None = None, *, aux_head: bool = False, **kw):
        super().__init__(time_sampler, **kw)
        self.aux_head = bool(aux_head)
        check(
            not self.aux_head or self.jvp_backend in ("forward-ad", "finite-difference"),
            "the auxiliary velocity head needs jvp_backend forward-ad or finite-difference "
            f"(func would need has_aux in the JVP), got {self.jvp_backend}",
        )

    def velocity(self, model, path: PathSample, r, t, y) -> torch.Tensor:
        """``v~`` with its guidance terms from the v-head when there is one."""
        return super().velocity(velocity_head(model) if self.aux_head else model, path, r, t, y)

    def tangent(self, model, z, r, t, v, y) -> torch.Tensor:
        """``v_hat = sg(u(z, t, t | y))`` (with ``aux_head``, the v-head's ``v(z, t, t | y)``),
        the network's velocity at ``z``, in eval mode (with guidance inputs, at the row's
        guidance scale: :meth:`GuidanceInputs.velocity_model`)."""
        return self.own_velocity(model, z, t, y).to(v.dtype)

    def own_velocity(self, model, z, t, y) -> torch.Tensor:
        """As :meth:`MeanFlow.own_velocity`, from the v-head when there is one."""
        return super().own_velocity(velocity_head(model) if self.aux_head else model, z, t, y)

    def prediction_and_target(self, model, z, r, t, v, y):
        """As :meth:`MeanFlow.prediction_and_target`; with ``aux_head`` on the whole batch,
        keeping the v-head output of the same forward (and ``v~``) for :meth:`_loss`."""
        if not self.aux_head:
            return super().prediction_and_target(model, z, r, t, v, y)
        tangent = self.tangent(model, z, r, t, v, y)
        if self.jvp_backend == "finite-difference":  # as total_derivative: u, then no graph
            zf, rf, tf, tan = (at_least_float32(a) for a in (z, r, t, tangent))
            with ExitStack() as stack:
                if self.jvp_dtype != "autocast":
                    stack.enter_context(torch.autocast(device_type=z.device.type, enabled=False))
                u, v_head = _call_aux(model, zf, rf, tf, y)
                dudt = finite_difference(
                    lambda z_, r_, t_: _call_aux(model, z_, r_, t_, y)[0],
                    zf,
                    rf,
                    tf,
                    tan,
                    at_least_float32(u.detach()),
                    self.fd_step,
                    self.fd_scheme,
                )
        else:
            both = _BothHeads(model)
            u, dudt = self._derivative(both, z, r, t, tangent, y)
            v_head = both.v
        target = (at_least_float32(v) - broadcast_time(t - r, dudt) * dudt).detach()
        self._aux = (at_least_float32(v_head), at_least_float32(v).detach())
        return u, target

    def _loss(self, model, x, y, noise, r, t, generator, cond=None):
        """MeanFlow's loss (on ``V``); with ``aux_head`` plus the v-head's adaptive-weighted
        ``||v - v~||^2`` (weight 1), in ``loss`` and ``per_sample`` (``err`` stays V's)."""
        out = super()._loss(model, x, y, noise, r, t, generator, cond)
        if not self.aux_head:
            return out
        v_head, target = self._aux
        del self._aux
        err_v = (v_head - target).pow(2).flatten(1).sum(dim=1)
        out.per_sample = out.per_sample + err_v / (err_v.detach() + self.c).pow(self.p)
        out.loss = out.per_sample.mean()
        return out


class _VelocityHead(torch.nn.Module):
    """The v-head of a two-headed network as a one-output model: ``v(z, r, t | y, ...)``."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def forward(self, z, r, t, y=None, **inputs):
        return _call_aux(self.net, z, r, t, y, **inputs)[1]


class _BothHeads(torch.nn.Module):
    """``u`` of a two-headed network as a one-output model for the JVP, keeping the v-head
    output of the last call in ``self.v`` (with its graph; under forward-mode AD the primal)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.v: torch.Tensor | None = None

    def forward(self, z, r, t, y=None):
        u, v = _call_aux(self.model, z, r, t, y)
        self.v = fwAD.unpack_dual(v).primal
        return u


def _call_aux(model, z, r, t, y=None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)`` of a network with the auxiliary velocity head (per-row inputs of a
    :class:`Conditioned` passed on)."""
    if isinstance(model, Conditioned):
        return _call_aux(model.net, z, r, t, y, **{**model.cond, **inputs})
    out = model(z, r, t, y=y, aux=True, **inputs)
    check(
        isinstance(out, tuple) and len(out) == 2,
        "aux_head=true needs a network with the auxiliary velocity head "
        "(--set model.aux_head=true), returning (u, v) for aux=True",
    )
    return out


def velocity_head(model):
    """``model``'s v-head as a one-output model (per-row inputs of a :class:`Conditioned`
    kept, so guidance sees its inputs as before)."""
    if isinstance(model, Conditioned):
        return Conditioned(_VelocityHead(model.net), model.cond)
    return _VelocityHead(model)


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
