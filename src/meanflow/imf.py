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
Adaptive weighting as MeanFlow's (the authors: ``p = 1``, ``c = 0.01``). Not implemented (yet):
guidance scale and interval as network inputs (sampled per row in training, chosen at sampling).
"""

from __future__ import annotations

import torch

from .guidance import GuidedMeanFlow, _evaluation_mode
from .jvp import at_least_float32
from .objective import MeanFlow


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
