"""Time embeddings shared by the networks (networks know nothing about objectives).

The network sees two time quantities (paper Table 1c); by default ``(t, t - r)``, the
authors' choice, with ``(t, r)``, ``(t, r, t - r)`` and ``(t - r)`` selectable. Each quantity is
embedded separately with sinusoidal features of times in [0, 1] (no x1000 scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import check

TIME_INPUTS = {
    "t,t-r": ("t", "t-r"),
    "t,r": ("t", "r"),
    "t,r,t-r": ("t", "r", "t-r"),
    "t-r": ("t-r",),
}


def time_quantities(kind: str, r: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """The scalars named by ``kind`` (a key of :data:`TIME_INPUTS`), each of shape (B,)."""
    values = {"t": t, "r": r, "t-r": t - r}
    return [values[name] for name in TIME_INPUTS[kind]]


class SinusoidalEmbedding(nn.Module):
    """``[s, sin(f_k s), cos(f_k s)]`` with angular frequencies ``f_k`` log-spaced in
    [1, max_freq]. The MeanFlow target contains d/dt of the network, so very high frequencies
    make targets noisy; the default tops out at 2 pi * 3 (three periods over [0, 1])."""

    def __init__(self, dim: int = 32, max_freq: float = 6 * math.pi) -> None:
        super().__init__()
        check(dim >= 2 and dim % 2 == 0, f"embedding dim must be even and >= 2, got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = dim + 1

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        angles = s[:, None] * self.freqs.to(s.dtype)
        return torch.cat([s[:, None], angles.sin(), angles.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """Embeds the chosen time quantities and concatenates them: (B,) x 2 -> (B, out_dim)."""

    def __init__(self, kind: str = "t,t-r", dim: int = 32, max_freq: float = 6 * math.pi) -> None:
        super().__init__()
        check(kind in TIME_INPUTS,
              f"time input must be one of {', '.join(TIME_INPUTS)}, got {kind!r}")
        self.kind = kind
        self.embed = SinusoidalEmbedding(dim, max_freq)
        self.out_dim = self.embed.out_dim * len(TIME_INPUTS[kind])

    def forward(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed(s) for s in time_quantities(self.kind, r, t)], dim=1)
