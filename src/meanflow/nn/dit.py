"""A DiT (Peebles & Xie 2023) obeying ``model(z, r, t, y=None) -> u``, ``z`` of shape (B, C, H, W).

``z`` -> Conv2d patchify (patch ``p``) + fixed 2-D sin-cos positional embedding -> ``depth``
transformer blocks with adaLN-Zero modulation -> final adaLN layer + Linear -> unpatchify.
The conditioning vector is, as in the MeanFlow paper (two time embedders, Table 1c),

    c = Emb_t(t) + Emb_h(t - r) + Emb_y(y)       (embeddings.Conditioning),

with times in [0, 1] fed to the sinusoidal features as they are (no x1000 scaling). Labels,
when ``num_classes > 0``, use a table with one extra row for the learned null label (index
``num_classes``), used when ``y`` is None; dropping labels for guidance is the caller's job.
All modulation layers and the final Linear start at zero, so the network outputs exactly 0.
Attention is :func:`.attention.attention`: SDPA's fast kernel forward with its own chunked
forward-mode and backward rules, so it needs no math backend inside the JVP. With
``input_size=32, in_channels=4, num_classes=1000`` the sizes in :data:`DIT_CONFIGS` give
about 131M (B/2), 308M (M/2), 459M (L/2) and 676M (XL/2) parameters.

``aux_head=True`` adds improved MeanFlow's auxiliary velocity head: the last ``aux_depth``
blocks branch into two heads of ``aux_depth`` blocks each (the first ``depth - aux_depth``
blocks are shared), each with its own final layer; ``aux_depth = 0`` shares every block and
adds a final layer only (the authors' B/2: depth 12, ``aux_depth`` 8). ``model(..., aux=True)``
returns ``(u, v)`` from one pass, ``model(...)`` ``u`` alone (the v-head is not run).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..errors import check
from .attention import attention
from .embeddings import Conditioning, check_image_call
from .forward_mode import GELU, Conv2d, LayerNorm, Linear, SiLU
from .forward_mode.fused import gated_add, modulate

#: depth, hidden width and attention heads; "T" is a tiny size for tests and toy runs.
DIT_CONFIGS = {
    "T": dict(depth=2, hidden=64, heads=4),
    "S": dict(depth=12, hidden=384, heads=6),
    "B": dict(depth=12, hidden=768, heads=12),
    "M": dict(depth=16, hidden=1024, heads=16),
    "L": dict(depth=24, hidden=1024, heads=16),
    "XL": dict(depth=28, hidden=1152, heads=16),
}


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a ``grid x grid`` token layout (row-major): (grid^2, dim).
    Token ``p = i * grid + j`` (row i, column j) gets ``[E(j), E(i)]``: the column in the first
    half of the channels, the row in the second, as in DiT/MAE's ``get_2d_sincos_pos_embed``
    (its ``meshgrid(grid_w, grid_h)`` puts w first), which the MeanFlow authors' DiT uses.
    ``E(x) = [sin(w_k x), cos(w_k x)]`` with ``w_k = 10000^(-k / (dim / 4))``, k < dim / 4."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.proj = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm attention and MLP, each wrapped as ``x + gate * f(modulate(norm(x), shift, scale))``
    with shift/scale/gate regressed from ``c`` (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        width = int(hidden * mlp_ratio)
        self.norm1 = LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            Linear(hidden, width), GELU(approximate="tanh"), Linear(width, hidden)
        )
        self.ada = nn.Sequential(SiLU(), Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = gated_add(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        return gated_add(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(SiLU(), Linear(hidden, 2 * hidden))
        self.linear = Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        patch: int = 2,
        hidden: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        guidance_inputs: bool = False,
        aux_head: bool = False,
        aux_depth: int = 0,
    ) -> None:
        super().__init__()
        check(
            0 <= aux_depth <= depth and (aux_head or aux_depth == 0),
            f"aux_depth must be in [0, depth={depth}] and needs aux_head, got {aux_depth}",
        )
        check(
            input_size >= 1 and in_channels >= 1 and patch >= 1,
            "input_size, in_channels and patch must be >= 1, "
            f"got {input_size}, {in_channels}, {patch}",
        )
        check(
            input_size % patch == 0,
            f"input_size {input_size} is not divisible by the patch size {patch}",
        )
        check(depth >= 1 and heads >= 1, f"depth and heads must be >= 1, got {depth}, {heads}")
        check(hidden % heads == 0, f"hidden {hidden} is not divisible by heads {heads}")
        check(hidden % 4 == 0, f"hidden must be a multiple of 4 (2-D sin-cos), got {hidden}")
        check(num_classes >= 0, f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.input_size, self.in_channels, self.patch = input_size, in_channels, patch
        self.num_classes, self.grid = num_classes, input_size // patch
        self.patchify = Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_2d(hidden, self.grid), persistent=False)
        self.cond = Conditioning(hidden, num_classes, guidance_inputs)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden, patch * patch * in_channels)
        self.aux_depth = aux_depth
        self.aux_blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio) for _ in range(aux_depth))
        self.aux_final = FinalLayer(hidden, patch * patch * in_channels) if aux_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier-uniform Linears with zero biases, N(0, 0.02) for the
        time MLPs and the label table, and zeros for every modulation and the final Linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patchify.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        assert self.patchify.bias is not None  # built with a bias
        nn.init.zeros_(self.patchify.bias)
        for emb in (self.cond.t_embedder, self.cond.h_embedder, *(self.cond.guidance or ())):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.cond.label is not None:
            nn.init.normal_(self.cond.label.weight, std=0.02)
        blocks = cast("list[Block]", [*self.blocks, *self.aux_blocks])  # typed nn.Module
        finals = [self.final] + ([self.aux_final] if self.aux_final is not None else [])
        outs = [layer for f in finals for layer in (f.ada[1], f.linear)]
        for layer in [blk.ada[1] for blk in blocks] + outs:
            assert isinstance(layer, nn.Linear)  # Sequential indexing is typed Sequential | Module
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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
            not aux or self.aux_final is not None,
            "aux=True needs the auxiliary velocity head (--set model.aux_head=true)",
        )
        check_image_call("DiT", z, r, t, y, self.in_channels, self.input_size)
        c = self.cond(r.to(z.dtype), t.to(z.dtype), y, guidance)
        x = self.patchify(z).flatten(2).transpose(1, 2) + self.pos_embed.to(z.dtype)
        shared = len(self.blocks) - self.aux_depth
        for block in self.blocks[:shared]:
            x = block(x, c)
        u = x
        for block in self.blocks[shared:]:
            u = block(u, c)
        u = self.unpatchify(self.final(u, c))
        if not aux:
            return u
        assert self.aux_final is not None  # checked above
        for block in self.aux_blocks:
            x = block(x, c)
        return u, self.unpatchify(self.aux_final(x, c))

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
        from .tangent_pass import dit_tangent_forward

        check_image_call("DiT", z, r, t, y, self.in_channels, self.input_size)
        return dit_tangent_forward(
            self, z, r, t, y, dz=dz, dr=dr, dt=dt, rows=rows, guidance=guidance
        )

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, g*g, p*p*C) tokens -> (B, C, g*p, g*p) images."""
        b = x.shape[0]
        g, p, ch = self.grid, self.patch, self.in_channels
        x = x.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(b, ch, g * p, g * p)


def dit(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    patch: int | None = None,
    **kwargs,
) -> DiT:
    """Build a DiT by name: ``"B/2"`` is size B with patch 2 (sizes: see :data:`DIT_CONFIGS`).
    A bare size (``"B"``) takes ``patch`` (default 2); extra keywords go to :class:`DiT`."""
    size, _, patch_text = str(name).partition("/")
    check(
        size in DIT_CONFIGS,
        f"unknown DiT config {name!r}; use SIZE/PATCH with SIZE one of {', '.join(DIT_CONFIGS)}",
    )
    if patch_text:
        check(
            patch_text.isdigit() and int(patch_text) >= 1,
            f"bad patch size in DiT config {name!r}; use e.g. 'B/2'",
        )
        check(
            patch is None or patch == int(patch_text),
            f"DiT config {name!r} says patch {patch_text} but patch={patch} was passed",
        )
        patch = int(patch_text)
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        patch=2 if patch is None else patch,
        num_classes=num_classes,
        **{**DIT_CONFIGS[size], **kwargs},
    )
