"""The linear probability path; the time convention of the whole package lives here.

Time runs from data (t = 0) to noise (t = 1)::

    z_t = (1 - t) * x + t * e,      e ~ N(0, I)
    v   = dz_t/dt = e - x           (conditional velocity)

Paper: Geng et al. 2025, "Mean Flows for One-step Generative Modeling", Sec. 3.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times ``t`` of shape (B,) to broadcast against ``like`` (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class PathSample:
    """A point on the path: ``z`` at time ``t`` and the conditional velocity ``v`` there."""

    z: torch.Tensor
    v: torch.Tensor


def linear_path(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> PathSample:
    """``z_t = (1 - t) x + t e`` and ``v = e - x`` for data ``x``, noise ``e``, times ``t`` (B,)."""
    tt = broadcast_time(t, x)
    return PathSample(z=(1 - tt) * x + tt * noise, v=noise - x)
