"""An MLP for vector data, obeying ``model(z, r, t, y=None) -> u`` with ``z`` of shape (B, D).

Input: ``[z, c]`` with ``c = [embed(time quantities), embed(label)]`` -> ``depth`` layers
``h <- SiLU(W h + U c)`` of width ``hidden`` (the condition enters every layer, which helps the
network represent how ``u`` changes with ``t`` and ``t - r``) -> Linear to D. Time quantities
default to ``(t, t - r)`` (see embeddings.py).
Labels, when ``num_classes > 0``, use a learned table with one extra row for the null label
(index ``num_classes``) that classifier-free guidance drops to.

``aux_head=True`` adds a second output layer on the shared trunk (improved MeanFlow's auxiliary
velocity head): ``model(..., aux=True)`` returns ``(u, v)`` from one pass, ``model(...)`` ``u``
alone, so sampling and every other caller see the one-output network.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .embeddings import SinusoidalEmbedding, TimeEmbedding, guidance_features, no_guidance
from .forward_mode import Linear, silu


class MLP(nn.Module):
    z_freqs: torch.Tensor  # a buffer, with z_features > 0

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        time_input: str = "t,t-r",
        time_dim: int = 32,
        num_classes: int = 0,
        label_dim: int = 32,
        guidance_inputs: bool = False,
        aux_head: bool = False,
        z_features: int = 0,
    ) -> None:
        super().__init__()
        check(z_features >= 0, f"z_features must be >= 0, got {z_features}")
        check(dim >= 1, f"data dimension must be >= 1, got {dim}")
        check(hidden >= 1 and depth >= 1, f"hidden and depth must be >= 1, got {hidden}, {depth}")
        self.dim, self.num_classes = dim, num_classes
        self.time = TimeEmbedding(time_input, time_dim)
        self.label = nn.Embedding(num_classes + 1, label_dim) if num_classes > 0 else None
        self.guidance = SinusoidalEmbedding(time_dim) if guidance_inputs else None
        cond_dim = (
            self.time.out_dim
            + (label_dim if num_classes > 0 else 0)
            + (3 * self.guidance.out_dim if self.guidance is not None else 0)
        )
        self.z_features = int(z_features)
        if z_features:  # angular frequencies 1, 2, 4, ..., 2^(K-1) per coordinate
            freqs = 2.0 ** torch.arange(z_features, dtype=torch.float32)
            self.register_buffer("z_freqs", freqs, persistent=False)
        self.inp = Linear(dim * (1 + 2 * self.z_features) + cond_dim, hidden)
        self.layers = nn.ModuleList(Linear(hidden, hidden) for _ in range(depth - 1))
        self.cond = nn.ModuleList(Linear(cond_dim, hidden, bias=False) for _ in range(depth - 1))
        self.out = Linear(hidden, dim)
        self.aux_out = Linear(hidden, dim) if aux_head else None

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` itself, or with ``z_features = K``: ``[z, sin(2^k z), cos(2^k z)]``,
        k = 0..K-1 per coordinate (Fourier features, Tancik et al. 2020), which let an MLP
        form the steep changes of a one-step map between separated modes."""
        if not self.z_features:
            return z
        angles = (z[:, :, None] * self.z_freqs.to(z.dtype)).flatten(1)
        return torch.cat([z, angles.sin(), angles.cos()], dim=1)

    def forward(
        self,
        z: torch.Tensor,
        r: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``u`` (``aux=True``: ``(u, v)``, the auxiliary head's output too)."""
        check(
            not aux or self.aux_out is not None,
            "aux=True needs the auxiliary velocity head (--set model.aux_head=true)",
        )
        parts = [self.time(r.to(z.dtype), t.to(z.dtype))]
        if self.label is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long)
            parts.append(self.label(y))
        if self.guidance is not None:  # improved MeanFlow's (omega, t_min, t_max) inputs
            g = no_guidance(z.shape[0], z) if guidance is None else guidance.to(z.dtype)
            parts += [self.guidance(s) for s in guidance_features(g)]
        else:
            check(
                guidance is None,
                "this network takes no guidance inputs (build it with "
                "guidance_inputs=True: --set guidance.inputs=true)",
            )
        c = torch.cat(parts, dim=1)
        h = silu(self.inp(torch.cat([self.encode(z), c], dim=1)))
        for layer, cond in zip(self.layers, self.cond):
            h = silu(layer(h) + cond(c))
        if aux:
            assert self.aux_out is not None  # checked above
            return self.out(h), self.aux_out(h)
        return self.out(h)

    def tangent_forward(
        self,
        z: torch.Tensor,
        r: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        dz: torch.Tensor,
        dr: torch.Tensor,
        dt: torch.Tensor,
        rows: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, du)``: ``u`` on every row (with graph where grad is enabled) and its derivative
        along ``(dz, dr, dt)`` on rows ``rows`` (None: all), without graph, in one pass of
        (value, tangent) pairs (:mod:`.tangent_pass`)."""
        from .tangent_pass import mlp_tangent_forward

        check(
            guidance is None or self.guidance is not None,
            "this network takes no guidance inputs (build it with "
            "guidance_inputs=True: --set guidance.inputs=true)",
        )
        return mlp_tangent_forward(
            self, z, r, t, y, dz=dz, dr=dr, dt=dt, rows=rows, guidance=guidance
        )
