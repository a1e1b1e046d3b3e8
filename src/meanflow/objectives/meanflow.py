"""The MeanFlow training objective (paper Sec. 4.1, Algorithm 1, Eq. 9-10).

The network ``u(z, r, t)`` models the average velocity over ``[r, t]``. The MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) * du/dt,     du/dt = v . d_z u + d_t u

gives the regression target ``u_tgt = sg(v - (t - r) du/dt)``, where ``du/dt`` is one JVP of
the network with tangent ``(v, 0, 1)`` on ``(z, r, t)``. Per sample,

    err  = sum over all non-batch dims of (u - u_tgt)^2
    loss = err / sg((err + c)^p)          (adaptive weighting, Sec. 4.3; p = 1, c = 1e-3)

and the batch loss is the mean of the per-sample losses. Flow matching is the special case
r = t, where the target is ``v`` and no JVP is needed (the paper's 0% ablation, Table 1a;
:class:`.flow_matching.FlowMatching`).

Objectives know nothing about networks: a model is any callable ``model(z, r, t, y=None)``.

All per-sample randomness of a step (label dropout, noise, times) comes from :meth:`MeanFlow.draw`
for a whole batch; a slice of those draws gives the same losses for those rows as the whole
batch would. That is how gradient accumulation and data-parallel training compute exactly the
single-process, full-batch objective (docs/distributed.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import MeanFlowError, check
from ..flow.jvp import (
    FD_SCHEMES,
    JVP_BACKENDS,
    at_least_float32,
    finite_difference,
    rows_derivative,
    rows_pass_available,
    total_derivative,
)
from ..flow.path import PathSample, broadcast_time, linear_path
from ..flow.times import TimeSampler
from .rows import Conditioned, Draws, ObjectiveOutput, _rows, _sub, evaluation_mode, rows_first

if TYPE_CHECKING:  # only held and called here; guidance.py builds on this module
    from .guidance import Guidance

__all__ = ["MeanFlow", "ObjectiveOutput", "Draws", "Conditioned", "rows_first"]

JVP_MODES = ("subset", "full", "detached")
JVP_DTYPES = ("float32", "autocast")


class MeanFlow:
    """The MeanFlow objective. Call as ``obj(model, x, y=None, *, noise=None, r=None, t=None)``.

    Subclasses change the method through the hooks :meth:`velocity`, :meth:`draw_times`,
    :meth:`tangent`, :meth:`prediction_and_target`, :meth:`row_scale` and :meth:`at_step`;
    guidance is a part the objective holds, not a subclass.

    Args:
        time_sampler: draws ``(r, t)`` when they are not given.
        p, c: adaptive loss weight ``1 / sg((err + c)^p)``; ``p = 0`` is the plain squared error.
        jvp_dtype: ``"float32"`` (default) runs the JVP with autocast disabled, in float32,
            whatever the surrounding precision; ``"autocast"`` lets it run in the autocast
            precision around the call (e.g. bf16; known to diverge late in training).
        jvp: ``"subset"`` (default) runs the JVP only on samples with ``r < t`` and an ordinary
            forward on the rest, whose target is exactly ``v``; ``"full"`` runs the JVP on the
            whole batch like the authors' code. Both give the same loss and gradients for
            networks that treat samples independently (no batch norm); each sample passes
            through the network once either way. ``"detached"`` runs the JVP without an
            autograd graph on the ``r < t`` samples and then one ordinary forward on the whole
            batch for the loss: cheaper, but those samples go through the network twice, so
            stochastic layers (dropout) see different masks in the two passes.
        jvp_backend: how ``du/dt`` is computed: ``"forward-ad"`` (default, dual tensors),
            ``"func"`` (``torch.func.jvp``; the same numbers) or ``"finite-difference"``
            (a difference along ``(v, 0, 1)`` with step ``fd_step``, scheme ``fd_scheme``;
            :func:`meanflow.flow.jvp.total_derivative`, docs/method.md "JVP back-ends").
        time_tangent: the JVP tangent ``(dr, dt)`` on ``(r, t)``: ``(0, 1)``, the total
            derivative the MeanFlow identity needs; others only for the paper's ablation.
        guidance: classifier-free guidance in the target
            (:class:`meanflow.objectives.guidance.Guidance`; class labels ``y`` are then
            required): label dropout before the loss and the guided velocity ``v~`` in place
            of ``v``. None: the conditional velocity ``v``.
        self_velocity: ``beta``, the share of the network's own velocity ``sg(u(z, t, t))``
            in the velocity of the r != t rows, ``(1 - beta) v + beta u(z, t, t)``, used as
            tangent and in the target (r = t rows keep ``v``). 0: MeanFlow; 1: the target
            depends on the data only through the r = t rows (Eulerian self-distillation,
            Boffi et al., arXiv 2505.18825); the fixed point is the same. One extra no-grad
            network evaluation per r != t row (docs/onestep.md, section (f)).
    """

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        *,
        p: float = 1.0,
        c: float = 1e-3,
        jvp: str = "subset",
        jvp_dtype: str = "float32",
        jvp_backend: str = "forward-ad",
        fd_step: float | None = None,
        time_tangent: tuple[float, float] = (0.0, 1.0),
        fd_scheme: str = "forward",
        guidance: Guidance | None = None,
        self_velocity: float = 0.0,
    ) -> None:
        check(p >= 0, f"adaptive weight power p must be >= 0, got {p}")
        check(c > 0, f"adaptive weight constant c must be > 0, got {c}")
        check(jvp in JVP_MODES, f"jvp mode must be one of {', '.join(JVP_MODES)}, got {jvp!r}")
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler()
        self.time_schedule = self.time_sampler  # at_step draws from its sampler of each step
        check(
            jvp_dtype in JVP_DTYPES,
            f"jvp_dtype must be one of {', '.join(JVP_DTYPES)}, got {jvp_dtype!r}",
        )
        self.p, self.c, self.jvp, self.jvp_dtype = p, c, jvp, jvp_dtype
        self.check_inputs = True  # value checks cost host syncs; the trainer turns them off
        check(
            jvp_backend in JVP_BACKENDS,
            f"jvp_backend must be one of {', '.join(JVP_BACKENDS)}, got {jvp_backend!r}",
        )
        check(
            fd_scheme in FD_SCHEMES,
            f"fd_scheme must be one of {', '.join(FD_SCHEMES)}, got {fd_scheme!r}",
        )
        check(fd_step is None or 0 < fd_step <= 0.5, f"fd_step must be in (0, 0.5], got {fd_step}")
        self.jvp_backend, self.fd_step, self.fd_scheme = jvp_backend, fd_step, fd_scheme
        check(len(time_tangent) == 2, f"time_tangent must be (dr, dt), got {time_tangent!r}")
        check(
            jvp_backend != "finite-difference" or tuple(time_tangent) == (0.0, 1.0),
            "finite differences support the tangent (v, 0, 1) only",
        )
        self.time_tangent = (float(time_tangent[0]), float(time_tangent[1]))
        self.guidance = guidance
        check(0.0 <= self_velocity <= 1.0, f"self_velocity must be in [0, 1], got {self_velocity}")
        self.self_velocity = float(self_velocity)

    # -- hooks for subclasses ----------------------------------------------------------------
    def velocity(
        self, model, path: PathSample, r: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        """The velocity used as JVP tangent and in the target: the conditional ``v``, or with
        guidance the guided ``v~`` (:meth:`Guidance.velocity`; ``y`` is already dropped)."""
        return path.v if self.guidance is None else self.guidance.velocity(model, path, t, y)

    def draw_times(self, n: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, t)`` for ``n`` samples from the time sampler."""
        return self.time_sampler(n, generator=generator, device=device)

    def draw(
        self,
        n: int,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Draws:
        """Every random input for a batch of ``n`` samples of ``shape``, in the order a call
        without them draws them (noise, then times), so ``obj(model, x, **obj.draw(...).kwargs())``
        equals ``obj(model, x, generator=...)`` for the same generator state. Guidance adds
        its own draws (:meth:`Guidance.draw`: the label-dropout mask)."""

        def noise_and_times() -> Draws:
            noise = torch.randn((n, *shape), generator=generator, device=device, dtype=dtype)
            r, t = self.draw_times(n, generator, device)
            return Draws(noise, r, t)

        if self.guidance is None:
            return noise_and_times()
        return self.guidance.draw(n, generator, device, noise_and_times)

    # -- the objective ---------------------------------------------------------------------
    def __call__(
        self,
        model,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
    ) -> ObjectiveOutput:
        """``drop``, ``guide``: the label-dropout mask and the rows' guidance inputs from
        :meth:`draw` (guided objectives; drawn here when absent); ``cond``: more per-row network
        inputs (B, ...), passed to the model as keywords (e.g. ``{"aug": labels}`` of EDM's
        augmentation)."""
        if self.guidance is None:
            check(drop is None, "drop (a label-dropout mask) needs a class-conditional objective")
            check(guide is None, "guide (per-row guidance inputs) needs guidance.inputs=true")
        else:
            y, noise, r, t, cond = self.guidance.prepare(
                self, x, y, noise, r, t, generator, drop, guide, cond
            )
        return self._loss(model, x, y, noise, r, t, generator, cond)

    def _loss(self, model, x, y, noise, r, t, generator, cond=None) -> ObjectiveOutput:
        if cond:
            check(
                all(v.shape[0] == x.shape[0] for v in cond.values()),
                "each cond input needs one row per sample",
            )
            model = Conditioned(model, cond)
        r, t, noise = self._inputs(x, noise, r, t, generator)
        path = linear_path(x, noise, t)
        v = self.velocity(model, path, r, t, y).detach()
        if self.self_velocity:
            v = self._own_velocity_mix(model, path.z, r, t, v, y)
        u, target = self.prediction_and_target(model, path.z, r, t, v, y)
        err = (at_least_float32(u) - target).pow(2).flatten(1).sum(dim=1)
        weight = (err.detach() + self.c).pow(self.p)
        per_sample = err / weight
        scale = self.row_scale(r, t)
        if scale is not None:
            per_sample = per_sample * scale
        return ObjectiveOutput(
            loss=per_sample.mean(),
            per_sample=per_sample,
            err=err.detach(),
            u=u,
            target=target,
            r=r,
            t=t,
        )

    def own_velocity(self, model, z, t, y) -> torch.Tensor:
        """``sg(u(z, t, t | y))``: the network's velocity at ``z`` (the average over an empty
        interval), in eval mode; with guidance inputs at the row's scale."""
        net = model if self.guidance is None else self.guidance.velocity_model(model, t)
        with torch.no_grad(), evaluation_mode(net):
            return at_least_float32(net(z, t, t, y=y))

    def _own_velocity_mix(self, model, z, r, t, v, y) -> torch.Tensor:
        """``v`` with its r != t rows replaced by ``(1 - beta) v + beta sg(u(z, t, t))``."""
        count, order = rows_first(r < t)
        if count == 0:
            return v
        idx = order[:count]
        own = self.own_velocity(_sub(model, idx), z[idx], t[idx], _rows(y, idx))
        out = at_least_float32(v).clone()
        beta = self.self_velocity
        out[idx] = (1 - beta) * out[idx] + beta * own
        return out.to(v.dtype)

    def at_step(self, step: int, total: int) -> None:
        """Called by the trainer before training step ``step`` of ``total``: the time
        sampler of that step (a schedule of the r != t share, ``time.ratio_start``);
        objectives with a schedule of their own (:class:`meanflow.objectives.alphaflow.AlphaFlow`)
        extend it."""
        if self.time_schedule.ratio_start >= 0:
            self.time_sampler = self.time_schedule.at(step, total)

    def row_scale(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """A per-row factor on the weighted loss (None: 1 everywhere)."""
        return None

    def tangent(self, model, z, r, t, v, y) -> torch.Tensor:
        """The z-tangent of the JVP: ``v`` itself (MeanFlow). Improved MeanFlow uses the
        network's own velocity prediction (:class:`meanflow.objectives.imf.ImprovedMeanFlow`)."""
        return v

    def prediction_and_target(self, model, z, r, t, v, y):
        """Return ``(u, u_tgt)`` with ``u_tgt = sg(v - (t - r) du/dt)``, ``du/dt`` along
        ``(tangent, 0, 1)`` (:meth:`tangent`; ``v`` for MeanFlow)."""
        if self.jvp == "full":
            return self._with_jvp(model, z, r, t, v, y, self.tangent(model, z, r, t, v, y))
        distinct = r < t
        if self.jvp == "detached" or (
            self.jvp_backend == "finite-difference" and not torch.is_autocast_enabled(z.device.type)
        ):
            return self._target_apart(model, z, r, t, v, y, distinct)
        count, order = rows_first(distinct)
        if count and rows_pass_available(model, z, self.jvp_backend):  # one pass, no split
            idx = order[:count]
            tangent = self.tangent(_sub(model, idx), z[idx], r[idx], t[idx], v[idx], _rows(y, idx))
            u, dudt = rows_derivative(model, z, r, t, tangent, y, idx, self.time_tangent)
            target = at_least_float32(v).clone()
            target[idx] -= broadcast_time(t[idx] - r[idx], dudt) * dudt
            return at_least_float32(u), target
        if count == len(r):
            return self._with_jvp(model, z, r, t, v, y, self.tangent(model, z, r, t, v, y))
        if count == 0:
            return model(z, r, t, y=y), at_least_float32(v)
        idx_mf, idx_fm = order[:count], order[count:]
        sub, rows = _sub(model, idx_mf), (z[idx_mf], r[idx_mf], t[idx_mf], v[idx_mf])
        y_mf = _rows(y, idx_mf)
        u_mf, tgt_mf = self._with_jvp(sub, *rows, y_mf, self.tangent(sub, *rows, y_mf))
        u_fm = _sub(model, idx_fm)(z[idx_fm], r[idx_fm], t[idx_fm], y=_rows(y, idx_fm))
        inverse = torch.argsort(torch.cat([idx_mf, idx_fm]))
        u = torch.cat([at_least_float32(u_mf), at_least_float32(u_fm)])[inverse]
        target = torch.cat([tgt_mf, at_least_float32(v[idx_fm])])[inverse]
        return u, target

    def _target_apart(self, model, z, r, t, v, y, distinct):
        """One forward with graph on every row, as flow matching does, for the loss; the
        targets of the r != t rows apart, without graph: by the JVP back-end (``jvp="detached"``)
        or, for finite differences, by the difference passes alone, reusing that forward's
        output as ``u(z, r, t)``. The r != t rows pass through the network twice."""
        u = model(z, r, t, y=y)
        target = at_least_float32(v).clone()
        count, order = rows_first(distinct)
        if count:
            idx = order[:count]
            sub, y_sub = _sub(model, idx), _rows(y, idx)
            zi, ri, ti, vi = (at_least_float32(a[idx]) for a in (z, r, t, v))
            tan = at_least_float32(self.tangent(sub, z[idx], r[idx], t[idx], v[idx], y_sub))
            if self.jvp_backend == "finite-difference":
                dudt = finite_difference(
                    lambda z_, r_, t_: sub(z_, r_, t_, y=y_sub),
                    zi,
                    ri,
                    ti,
                    tan,
                    at_least_float32(u.detach()[idx]),
                    self.fd_step,
                    self.fd_scheme,
                )
            else:
                with torch.no_grad():
                    _, dudt = self._derivative(sub, zi, ri, ti, tan, y_sub)
            target[idx] = (vi - broadcast_time(ti - ri, dudt) * dudt).to(target.dtype)
        return u, target

    def _derivative(self, model, z, r, t, v, y):
        """``(u, du/dt)`` along ``(v, 0, 1)`` by this objective's JVP back-end and precision."""
        return total_derivative(
            model,
            z,
            r,
            t,
            v,
            y,
            autocast=self.jvp_dtype == "autocast",
            backend=self.jvp_backend,
            fd_step=self.fd_step,
            fd_scheme=self.fd_scheme,
            time_tangent=self.time_tangent,
        )

    def _with_jvp(self, model, z, r, t, v, y, tangent):
        u, dudt = self._derivative(model, z, r, t, tangent, y)
        target = at_least_float32(v) - broadcast_time(t - r, dudt) * dudt
        return u, target.detach()

    def _inputs(self, x, noise, r, t, generator):
        check(
            x.dim() >= 2 and x.shape[0] > 0,
            f"data batch must have shape (B, ...) with B > 0, got {tuple(x.shape)}",
        )
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        check(
            noise.shape == x.shape,
            f"noise shape {tuple(noise.shape)} must equal data shape {tuple(x.shape)}",
        )
        if (r is None) != (t is None):
            raise MeanFlowError("pass both r and t, or neither (then they are sampled)")
        if r is None:
            r, t = self.draw_times(x.shape[0], generator, x.device)
        b = x.shape[0]
        check(
            r.shape == (b,) and t.shape == (b,),
            f"r and t must have shape ({b},), got {tuple(r.shape)} and {tuple(t.shape)}",
        )
        if self.check_inputs:  # a host sync: the trainer, whose draws are valid, turns it off
            check(
                bool(((0 <= r) & (r <= t) & (t <= 1)).all()), "times must satisfy 0 <= r <= t <= 1"
            )
        return r, t, noise
