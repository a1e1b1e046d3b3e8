"""Flow matching as the r = t case of :class:`.meanflow.MeanFlow`: target ``v``, no JVP (the
MeanFlow paper's 0% ablation, Table 1a)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import check
from ..flow.times import TimeSampler
from .meanflow import MeanFlow

if TYPE_CHECKING:
    from .guidance import Guidance

__all__ = ["FlowMatching"]


class FlowMatching(MeanFlow):
    """Flow matching with the same interface: r = t everywhere, target ``v`` (or, with
    ``guidance``, the guided ``v~``), no JVP.

    Times are one draw ``t ~ D_t`` of the sampler's distribution (:meth:`TimeSampler.single`),
    the standard flow-matching choice; the MeanFlow sampler's own r = t samples use the max of
    two draws, as in the authors' code. Given times are refused unless r == t. The adaptive
    weighting is kept (set ``p = 0`` for the plain squared error). ``options``: the other
    keywords of :class:`MeanFlow` (its JVP settings are checked, and unused).
    """

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        *,
        p: float = 1.0,
        c: float = 1e-3,
        guidance: Guidance | None = None,
        **options,
    ) -> None:
        super().__init__(time_sampler, p=p, c=c, jvp="subset", guidance=guidance, **options)

    def draw_times(self, n: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.time_sampler.single(n, generator=generator, device=device)
        return t, t

    def _inputs(self, x, noise, r, t, generator):
        r, t, noise = super()._inputs(x, noise, r, t, generator)
        check(
            not self.check_inputs or bool((r == t).all()),
            "flow matching needs r == t for every sample",
        )
        return r, t, noise
