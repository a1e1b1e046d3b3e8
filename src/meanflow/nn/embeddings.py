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
from .forward_mode import Linear, SiLU
from .forward_mode.fused import sinusoid

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

    freqs: torch.Tensor  # a buffer (register_buffer)

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
        check(
            kind in TIME_INPUTS, f"time input must be one of {', '.join(TIME_INPUTS)}, got {kind!r}"
        )
        self.kind = kind
        self.embed = SinusoidalEmbedding(dim, max_freq)
        self.out_dim = self.embed.out_dim * len(TIME_INPUTS[kind])

    def forward(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed(s) for s in time_quantities(self.kind, r, t)], dim=1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features ``[cos(f_k s), sin(f_k s)]`` (``f_k`` from 1 down to 1/max_period,
    ``freq_dim`` features) followed by Linear-SiLU-Linear: (B,) -> (B, hidden). Times in [0, 1]
    are used as they are (no x1000 scaling)."""

    freqs: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.mlp = nn.Sequential(Linear(2 * half, hidden), SiLU(), Linear(hidden, hidden))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(s, self.freqs.to(s.dtype)))


def guidance_features(guidance: torch.Tensor) -> list[torch.Tensor]:
    """The guidance conditions ``(omega, t_min, t_max)`` (B, 3) as the scalars a network embeds:
    ``1 - 1/omega`` (0 for no guidance, bounded as omega grows, as the iMF authors embed it),
    ``t_min`` and ``t_max``."""
    check(
        guidance.dim() == 2 and guidance.shape[1] == 3,
        f"guidance must have shape (B, 3) = (omega, t_min, t_max), got {tuple(guidance.shape)}",
    )
    omega, t_min, t_max = guidance.unbind(1)
    return [1 - 1 / omega, t_min, t_max]


def no_guidance(n: int, like: torch.Tensor) -> torch.Tensor:
    """``(omega, t_min, t_max) = (1, 0, 1)`` for ``n`` rows: the unguided velocity."""
    return torch.tensor([1.0, 0.0, 1.0], device=like.device, dtype=like.dtype).expand(n, 3)


class Conditioning(nn.Module):
    """The image networks' condition ``c = Emb_t(t) + Emb_h(t - r) (+ Emb_y(y))`` (paper Table 1c:
    separate embedders for t and t - r). Labels use a table with ``num_classes + 1`` rows; the
    last (index ``num_classes``) is the learned null label, used when ``y`` is None. With
    ``guidance_inputs`` (improved MeanFlow's flexible guidance) three more embedders add the
    guidance scale and interval (:func:`guidance_features`; absent: omega = 1 over [0, 1])."""

    def __init__(self, hidden: int, num_classes: int = 0, guidance_inputs: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.t_embedder = TimestepEmbedder(hidden)
        self.h_embedder = TimestepEmbedder(hidden)
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.guidance = (
            nn.ModuleList(TimestepEmbedder(hidden) for _ in range(3)) if guidance_inputs else None
        )

    def forward(
        self,
        r: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.t_embedder(t) + self.h_embedder(t - r)
        if self.label is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            c = c + self.label(y)
        if self.guidance is not None:
            g = no_guidance(t.shape[0], t) if guidance is None else guidance.to(t.dtype)
            for embed, s in zip(self.guidance, guidance_features(g)):
                c = c + embed(s)
        else:
            check(
                guidance is None,
                "this network takes no guidance inputs (build it with "
                "guidance_inputs=True: --set guidance.inputs=true)",
            )
        return c


def check_image_call(
    name: str,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    channels: int,
    size: int,
) -> None:
    """One clear error for a call ``model(z, r, t, y)`` of an image network with wrong shapes."""
    want = (channels, size, size)
    check(
        z.dim() == 4 and tuple(z.shape[1:]) == want,
        f"{name} expects z of shape (B, {', '.join(map(str, want))}), got {tuple(z.shape)}",
    )
    b = z.shape[0]
    check(
        r.shape == (b,) and t.shape == (b,),
        f"r and t must have shape ({b},), got {tuple(r.shape)} and {tuple(t.shape)}",
    )
    if y is not None:
        check(y.shape == (b,), f"y must have shape ({b},), got {tuple(y.shape)}")


def check_unet_args(
    in_channels: int,
    input_size: int,
    channels: int,
    channel_mult: tuple,
    blocks: int,
    dropout: float,
    channels_name: str,
    blocks_name: str,
) -> None:
    """One-line errors for the arguments U-Nets share (ours and the SongUNet)."""
    check(
        in_channels >= 1 and input_size >= 1 and channels >= 1,
        f"in_channels, input_size and {channels_name} must be >= 1, "
        f"got {in_channels}, {input_size}, {channels}",
    )
    check(
        len(channel_mult) >= 1 and all(m >= 1 for m in channel_mult),
        f"channel_mult must be a non-empty tuple of ints >= 1, got {channel_mult}",
    )
    check(blocks >= 1, f"{blocks_name} must be >= 1, got {blocks}")
    check(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")


def resolve_config(configs: dict, name: str, what: str, input_size: int, overrides: dict) -> dict:
    """The keyword arguments of a named U-Net config with ``overrides`` applied; its
    ``attention_downsample`` factors become ``attention_resolutions`` for ``input_size``."""
    check(name in configs, f"unknown {what} config {name!r}; use one of {', '.join(configs)}")
    cfg = {**configs[name], **overrides}
    factors = tuple(cfg.pop("attention_downsample", ()))
    if "attention_resolutions" not in overrides:
        check(
            all(d >= 1 and input_size % d == 0 for d in factors),
            f"input_size {input_size} is not divisible by the attention downsampling "
            f"factors {factors} of {what} config {name!r}",
        )
        cfg["attention_resolutions"] = tuple(input_size // d for d in factors)
    return cfg
