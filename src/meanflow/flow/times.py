"""Sampling the time pair (r, t) with 0 <= r <= t <= 1.

Two independent draws ``a ~ D_t`` and ``b ~ D_r`` are ordered, ``t = max(a, b)``,
``r = min(a, b)``, as in the authors' code. Then, independently per sample, with probability
``1 - ratio`` we set ``r = t`` (plain flow matching, the target reduces to ``v``). ``D`` is
logit-normal, ``sigmoid(N(mean, std))`` (paper Sec. 4.3, Table 1d), or uniform on [0, 1].

Defaults are the paper's ImageNet values: logit-normal(-0.4, 1.0), 25% of samples r != t
(Table 1a). The authors' improved CIFAR-10 recipe draws t and r from different logit-normals
(t: (-0.6, 1.6), r: (-4.0, 1.6)), hence the optional ``r_mean`` / ``r_std``.

``order="official-v1"`` is the authors' improved CIFAR-10 sampler (py-meanflow, ``tr_sampler=v1``):
t and r are drawn independently and t is *not* sorted; with probability ``1 - ratio`` r = t; then
``r = min(t, r)``. So t keeps the law ``D_t`` (not the max of two draws), and a row meant to have
r != t ends with r = t whenever its draw of r exceeded t: P(r < t) = ratio * P(b < a), about
0.70 at ratio 0.75 with their times (t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6)).

``mix`` (0 by default) is the fraction of rows whose two draws ``a``, ``b`` are uniform on [0, 1]
instead of ``D_t``, ``D_r``: under ``order="sorted"`` those rows' ``(r, t)`` (when r != t) are
uniform on the triangle ``0 <= r <= t <= 1`` (density 2), so every interval a k-step sampler
uses, e.g. ``[0.5, 1]``, ``[0, 0.5]``, ``[0.75, 1]``, is trained whatever ``D_r`` is (an r law
such as LN(-4, 1.6) alone almost never gives r > 0.25). A mixture
``(1 - mix) D + mix U`` of each draw, chosen per row.

``flat`` chooses the time of the r = t rows: ``"max"`` (default, the authors') keeps
``t = max(a, b)`` of the (possibly uniform) draws; ``"single"`` gives them the first draw
``a ~ D_t`` before any mixing, the law flow matching trains on. With ``mix`` the max of two
uniform draws has density ``2t``, so under ``"max"`` few r = t rows land near the data
(``toy-2d``: 4.3% of them at t < 0.1 against 16% of flow matching's times); ``"single"``
restores flow matching's coverage there (docs/onestep.md, section (f)). Same random draws
either way.

``ratio_start`` (off when negative, the default) makes the r != t share a schedule: it moves
linearly from ``min(ratio_start, ratio)`` at the first training step to ``ratio`` at the last
(:meth:`TimeSampler.at`, which the objective calls each step), so that a run can learn the
velocity (r = t rows) before the average velocity that is built from it (docs/onestep.md,
section (f)).

Flow matching (``FlowMatching``) uses :meth:`TimeSampler.single`, one draw ``t ~ D_t``, the
standard flow-matching sampler, rather than the max of two draws.

Choice (documented in docs/method.md): the authors' code makes a fixed share of each batch
r != t; we draw it per sample (Bernoulli(ratio)), which has the same expectation and keeps
each sample's time independent of its position in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import check

DISTRIBUTIONS = ("logit-normal", "uniform")
ORDERS = ("sorted", "official-v1")
FLAT_LAWS = ("max", "single")


@dataclass
class TimeSampler:
    """Draws ``(r, t)`` per sample. See the module docstring for the distribution."""

    dist: str = "logit-normal"
    mean: float = -0.4
    std: float = 1.0
    r_mean: float | None = None
    r_std: float | None = None
    ratio: float = 0.25
    order: str = "sorted"
    mix: float = 0.0
    flat: str = "max"
    ratio_start: float = -1.0

    def __post_init__(self) -> None:
        check(
            self.order in ORDERS,
            f"time order must be one of {', '.join(ORDERS)}, got {self.order!r}",
        )
        check(
            self.dist in DISTRIBUTIONS,
            f"time distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.dist!r}",
        )
        check(
            0.0 <= self.ratio <= 1.0,
            f"the fraction of samples with r != t must be in [0, 1], got {self.ratio}",
        )
        check(
            0.0 <= self.mix <= 1.0,
            f"the fraction of uniform time draws (mix) must be in [0, 1], got {self.mix}",
        )
        check(
            self.flat in FLAT_LAWS,
            f"time flat (the r = t rows' time) must be one of {', '.join(FLAT_LAWS)}, "
            f"got {self.flat!r}",
        )
        check(
            self.ratio_start < 0 or self.ratio_start <= 1.0,
            f"time ratio_start must be in [0, 1] (negative: no schedule), got {self.ratio_start}",
        )
        for name in ("std", "r_std"):
            value = getattr(self, name)
            check(value is None or value > 0, f"time {name} must be > 0, got {value}")

    def _draw(self, n: int, mean: float, std: float, generator, device) -> torch.Tensor:
        if self.dist == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))

    def at(self, step: int, total: int) -> TimeSampler:
        """The sampler of training step ``step`` (0-based) of ``total``: with ``ratio_start``
        set, the r != t share ``s + (ratio - s) * step / (total - 1)`` with ``s =
        min(ratio_start, ratio)`` (so ``ratio = 0`` stays flow matching); without, ``self``."""
        if self.ratio_start < 0:
            return self
        start = min(self.ratio_start, self.ratio)  # never above the share asked for
        frac = step / max(total - 1, 1)
        return replace(self, ratio=start + (self.ratio - start) * frac)

    def single(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """One draw ``t ~ D_t`` per sample: the usual flow-matching time distribution."""
        return self._draw(batch_size, self.mean, self.std, generator, device)

    def __call__(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(r, t)``, each of shape (batch_size,), float32, with r <= t."""
        a = self._draw(batch_size, self.mean, self.std, generator, device)
        r_mean = self.mean if self.r_mean is None else self.r_mean
        r_std = self.std if self.r_std is None else self.r_std
        b = self._draw(batch_size, r_mean, r_std, generator, device)
        first = a
        if self.mix > 0:  # these rows draw a and b uniformly (module docstring)
            uniform = torch.rand(2, batch_size, generator=generator, device=device)
            pick = torch.rand(batch_size, generator=generator, device=device) < self.mix
            a, b = torch.where(pick, uniform[0], a), torch.where(pick, uniform[1], b)
        if self.order == "official-v1":  # mask first, then r = min(t, r); t unsorted
            distinct = torch.rand(batch_size, generator=generator, device=device) < self.ratio
            r, t = torch.minimum(a, torch.where(distinct, b, a)), a
        else:
            t, r = torch.maximum(a, b), torch.minimum(a, b)
            distinct = torch.rand(batch_size, generator=generator, device=device) < self.ratio
            r = torch.where(distinct, r, t)
        if self.flat == "single":  # r = t rows: flow matching's law, the unmixed first draw
            flat = r == t
            t, r = torch.where(flat, first, t), torch.where(flat, first, r)
        return r, t
