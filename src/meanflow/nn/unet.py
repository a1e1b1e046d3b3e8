"""A pixel-space U-Net (DDPM / ADM / NCSN++ family) obeying ``model(z, r, t, y=None) -> u``.

``z`` of shape (B, C, H, W) with H = W = ``input_size``. Layout: Conv3x3 in -> one level per
channel multiplier, each with ``num_res_blocks`` ResNet blocks (plus self-attention where the
level's resolution is in ``attention_resolutions``) and a stride-2 Conv3x3 between levels ->
middle ResBlock-Attention-ResBlock -> mirrored up path with ``num_res_blocks + 1`` blocks per
level, each fed the matching down-path activation concatenated on channels, nearest x2 + Conv3x3
between levels -> GroupNorm-SiLU-Conv3x3 out. ``len(channel_mult)`` levels need ``input_size``
divisible by ``2 ** (levels - 1)``: 28 -> 14 -> 7 with three levels, 32 -> 16 -> 8 likewise.

The conditioning vector is :class:`meanflow.nn.embeddings.Conditioning` (two time embedders,
times in [0, 1] as they are, a label table with one extra null row at index ``num_classes``
used when ``y`` is None): ``c = Emb_t(t) + Emb_h(t - r) (+ Emb_y(y))``. Each ResBlock maps
``SiLU(c)`` to a per-channel scale and shift applied after its second GroupNorm (ADM's
scale-shift norm). The second conv of every ResBlock, the attention output projections and the
output conv start at zero, so the network outputs exactly 0 at init. Attention is
:func:`meanflow.nn.attention.attention` (SDPA's kernel forward, a chunked forward-mode rule) and
the convolutions, norms and linear
layers are :mod:`meanflow.nn.forward_mode`'s, whose JVP rules skip the weights' zero tangents.

Sizes (:data:`UNET_CONFIGS`, attention given there as a downsampling factor of the input):
"small" has 1.8M parameters at 28x28x1; "cifar10-paper" has 58.5M at 32x32x3 (unconditional),
close to the size of the DDPM++/NCSN++ networks (EDM, 56M) the paper uses on CIFAR-10; it is not
a replication of NCSN++ (no FIR resampling, no progressive input/output branches).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check
from .attention import attention
from .embeddings import Conditioning, check_image_call, check_unet_args, resolve_config
from .forward_mode import Conv2d, GroupNorm, Linear, SiLU, silu

#: base channels, channel multipliers (one level each), ResBlocks per level, attention at
#: ``input_size // d`` for each ``d`` in ``attention_downsample``, dropout, GroupNorm groups.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_downsample=(2,),
        dropout=0.1,
        groups=4,
    ),
    "small": dict(
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_downsample=(4,),
        dropout=0.1,
        groups=8,
    ),
    "cifar10-paper": dict(
        base_channels=128,
        channel_mult=(2, 2, 2),
        num_res_blocks=4,
        attention_downsample=(2,),
        dropout=0.2,
        groups=32,
    ),
}


def conv3x3(cin: int, cout: int, stride: int = 1, zero: bool = False) -> nn.Conv2d:
    conv = Conv2d(cin, cout, 3, stride=stride, padding=1)
    if zero:
        assert conv.bias is not None  # built with a bias
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3, then GroupNorm * (1 + scale) + shift from the conditioning,
    SiLU, dropout, Conv3x3 (zero-init); a 1x1 conv on the skip when channels change."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = conv3x3(cin, cout)
        self.emb = Linear(emb_dim, 2 * cout)
        self.norm2 = GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(cout, cout, zero=True)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the H*W positions; output projection at zero."""

    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm(groups, ch)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.proj = Conv2d(ch, ch, 1)
        assert self.proj.bias is not None  # built with a bias
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, ch, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, ch // self.heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, ch/heads)
        out = attention(q, k, v)
        # contiguous: with one head the reshape is a view in channels-last order, and the 1x1
        # convolution's weight gradient then took that layout (DDP warned about its strides)
        return x + self.proj(out.transpose(-1, -2).reshape(b, ch, hgt, wid).contiguous())


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = conv3x3(ch, ch, stride=2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = conv3x3(ch, ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of blocks that all take ``(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, emb)
        return x


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 32,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        num_classes: int = 0,
        groups: int = 32,
        heads: int = 1,
        guidance_inputs: bool = False,
        aux_head: bool = False,
    ) -> None:
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        check_unet_args(
            in_channels,
            input_size,
            base_channels,
            channel_mult,
            num_res_blocks,
            dropout,
            "base_channels",
            "num_res_blocks",
        )
        check(num_classes >= 0, f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        levels = len(channel_mult)
        check(
            input_size % 2 ** (levels - 1) == 0,
            f"input_size {input_size} is not divisible by 2^{levels - 1} = {2 ** (levels - 1)}"
            f" ({levels} levels from channel_mult {channel_mult}); use fewer levels",
        )
        widths = [base_channels * m for m in channel_mult]
        check(
            groups >= 1 and all(w % groups == 0 for w in widths),
            f"every level width {widths} must be divisible by groups={groups}",
        )
        check(
            heads >= 1 and all(w % heads == 0 for w in widths),
            f"every level width {widths} must be divisible by heads={heads}",
        )
        sizes = [input_size // 2**i for i in range(levels)]
        missing = [a for a in attention_resolutions if a not in sizes]
        check(
            not missing,
            f"attention resolutions {missing} are not among the level "
            f"resolutions {sizes} of a {input_size}x{input_size} input",
        )
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        emb_dim = 4 * base_channels
        self.cond = Conditioning(emb_dim, num_classes, guidance_inputs)
        if self.cond.label is not None:
            nn.init.normal_(self.cond.label.weight, std=0.02)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, groups)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, groups)

        ch = widths[0]
        self.conv_in = conv3x3(in_channels, ch)
        skips, self.down = [ch], nn.ModuleList()
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                stage = Stage([res(ch, width)])
                ch = width
                if sizes[level] in attention_resolutions:
                    stage.append(attn(ch))
                self.down.append(stage)
                skips.append(ch)
            if level < levels - 1:
                self.down.append(Stage([Downsample(ch)]))
                skips.append(ch)
        self.mid = Stage([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                stage = Stage([res(ch + skips.pop(), widths[level])])
                ch = widths[level]
                if sizes[level] in attention_resolutions:
                    stage.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(stage)
        self.out = nn.Sequential(GroupNorm(groups, ch), SiLU(), conv3x3(ch, in_channels, zero=True))
        self.aux_out = (  # improved MeanFlow's auxiliary velocity head (forward's aux=True)
            nn.Sequential(GroupNorm(groups, ch), SiLU(), conv3x3(ch, in_channels, zero=True))
            if aux_head
            else None
        )

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
        check_image_call("UNet", z, r, t, y, self.in_channels, self.input_size)
        emb = silu(self.cond(r.to(z.dtype), t.to(z.dtype), y, guidance))
        h = self.conv_in(z)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
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
        from .tangent_pass import unet_tangent_forward

        check_image_call("UNet", z, r, t, y, self.in_channels, self.input_size)
        return unet_tangent_forward(
            self, z, r, t, y, dz=dz, dr=dr, dt=dt, rows=rows, guidance=guidance
        )


def unet(
    name: str, in_channels: int = 3, input_size: int = 32, num_classes: int = 0, **overrides
) -> UNet:
    """Build a U-Net by name (see :data:`UNET_CONFIGS`); keywords override the config. Pass
    ``attention_resolutions`` (absolute sizes) or ``attention_downsample`` (factors)."""
    cfg = resolve_config(UNET_CONFIGS, name, "U-Net", input_size, overrides)
    return UNet(in_channels=in_channels, input_size=input_size, num_classes=num_classes, **cfg)
