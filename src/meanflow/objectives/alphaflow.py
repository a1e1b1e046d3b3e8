"""AlphaFlow (Zhang et al., "AlphaFlow: Understanding and Improving MeanFlow Models", arXiv
2510.20771): a curriculum from trajectory flow matching to MeanFlow.

For a row with r < t and ``alpha`` in (0, 1], the intermediate time and point are

    s = alpha * r + (1 - alpha) * t,        z_s = z_t - (t - s) * v

(one Euler step along the conditional velocity ``v``, or the guided ``v~``), and the target is

    u_tgt = alpha * v + (1 - alpha) * sg(u(z_s, r, s))

which at ``alpha = 1`` is trajectory flow matching (``u_tgt = v``: no second network call).
For small ``alpha``, ``u(z_s, r, s) = u - alpha (t - r) du/dt + O(alpha^2)``, so

    (u_tgt - u) / alpha -> v - (t - r) du/dt - u,

the step towards MeanFlow's target: the regression pulls ``u`` the MeanFlow way, by a step
that shrinks with ``alpha``. At ``alpha = 0`` the objective *is* MeanFlow (one JVP). Rows with
r = t have ``u_tgt = v`` throughout. The second
evaluation runs without graph, with the current weights (not the EMA), as in the authors' code.

Loss: MeanFlow's adaptive weighting per row, times ``alpha`` on the r < t rows while
``0 < alpha`` (the authors' code; the paper writes 1/alpha). Their clamp of ``u_tgt`` to +-4 in
some runs is not applied.

Schedule (:func:`alpha_schedule`, the authors' "sigmoid" one): with ``mid`` the middle of the
window ``[begin, finish]`` of training steps,

    alpha = start + (end - start) * sigmoid(gamma * (step - mid) / (finish - begin)),

``start`` before the window and ``end`` after it, then snapped to 0 below ``snap`` and to 1
above ``1 - snap``. Authors' recipe: start 1, end 0, gamma 25, snap 0.005, the window the whole
run (B/2 without guidance; their XL/2 run uses the steps 600k to 1M of 1.2M).
"""

from __future__ import annotations

import math

import torch

from ..errors import check
from ..flow.jvp import at_least_float32
from ..flow.path import broadcast_time
from ..flow.times import TimeSampler
from .guidance import guidance_attribute, guidance_from, set_guidance_attribute
from .meanflow import MeanFlow
from .rows import _rows, _sub, rows_first


def alpha_schedule(
    step: int,
    total: int,
    *,
    start: float = 1.0,
    end: float = 0.0,
    gamma: float = 25.0,
    begin: float = 0.0,
    finish: float = 1.0,
    snap: float = 0.005,
) -> float:
    """``alpha`` at training step ``step`` of ``total`` (module docstring); the window
    ``[begin, finish]`` is given as fractions of ``total``."""
    lo, hi = begin * total, finish * total
    if step <= lo:
        alpha = start
    elif step >= hi:
        alpha = end
    else:
        x = gamma * (step - (lo + hi) / 2) / (hi - lo)
        alpha = start + (end - start) / (1 + math.exp(-x))
    if alpha < snap:
        return 0.0
    return 1.0 if alpha > 1 - snap else alpha


class AlphaFlow(MeanFlow):
    """The AlphaFlow objective: ``alpha`` follows :func:`alpha_schedule` as the trainer calls
    :meth:`at_step`; set ``objective.alpha`` directly to fix it. Positional and other keyword
    arguments go to :class:`MeanFlow` (the JVP options matter once ``alpha`` reaches 0); with
    ``guidance``, ``v~`` replaces ``v`` in the Euler step and the target, as the authors'
    ``_compute_velocity_cfg``."""

    def __init__(
        self,
        *args,
        start: float = 1.0,
        end: float = 0.0,
        gamma: float = 25.0,
        begin: float = 0.0,
        finish: float = 1.0,
        snap: float = 0.005,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        check(
            0 <= start <= 1 and 0 <= end <= 1,
            f"alpha start and end must be in [0, 1], got {start} and {end}",
        )
        check(gamma > 0, f"alpha gamma must be > 0, got {gamma}")
        check(
            0 <= begin < finish <= 1,
            f"alpha window must satisfy 0 <= begin < finish <= 1 "
            f"(fractions of the run), got [{begin}, {finish}]",
        )
        check(0 <= snap < 0.5, f"alpha snap must be in [0, 0.5), got {snap}")
        self.schedule = dict(
            start=start, end=end, gamma=gamma, begin=begin, finish=finish, snap=snap
        )
        self.alpha = alpha_schedule(0, 1, **self.schedule)

    def at_step(self, step: int, total: int) -> None:
        """Set ``alpha`` (and the time sampler) for training step ``step`` (0-based) of
        ``total``."""
        super().at_step(step, total)
        self.alpha = alpha_schedule(step, total, **self.schedule)

    def row_scale(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """``alpha`` on the r < t rows while ``0 < alpha < 1``; None (all 1) otherwise."""
        if self.alpha in (0.0, 1.0):
            return None
        return torch.where(r < t, self.alpha, 1.0).to(torch.float32)

    def prediction_and_target(self, model, z, r, t, v, y):
        if self.alpha == 0:
            return super().prediction_and_target(model, z, r, t, v, y)
        u = model(z, r, t, y=y)
        target = at_least_float32(v).clone()
        if self.alpha < 1:
            count, order = rows_first(r < t)
            if count:
                idx = order[:count]
                ri, ti, vi = r[idx], t[idx], at_least_float32(v[idx])
                s = self.alpha * ri + (1 - self.alpha) * ti
                zs = at_least_float32(z[idx]) - broadcast_time(ti - s, vi) * vi
                with torch.no_grad():
                    us = _sub(model, idx)(zs.to(z.dtype), ri, s, y=_rows(y, idx))
                target[idx] = self.alpha * vi + (1 - self.alpha) * at_least_float32(us)
        return u, target


class GuidedAlphaFlow(AlphaFlow):
    """AlphaFlow with classifier-free guidance folded into ``v~``: ``AlphaFlow(time_sampler,
    guidance=Guidance(num_classes, ...), ...)`` under its earlier name; ``num_classes`` first,
    then the keywords of :class:`meanflow.objectives.guidance.GuidedMeanFlow` and of
    :class:`AlphaFlow`."""

    def __init__(
        self, num_classes: int, time_sampler: TimeSampler | None = None, **options
    ) -> None:
        guidance = guidance_from(num_classes, options)
        super().__init__(time_sampler, guidance=guidance, **options)

    __getattr__ = guidance_attribute
    __setattr__ = set_guidance_attribute
