"""Batched affine warps of images as EDM resamples them (used by :mod:`.augment`).

Resampling (as EDM): the geometric map is applied in pixel coordinates centred on the image,
the image is reflection-padded by the margin the transformed corners need, upsampled 2x with the
``sym6`` wavelet low-pass filter, sampled bilinearly with ``grid_sample`` and downsampled 2x with
the same filter. The up/down pair is exactly the identity (the filter is orthonormal to its even
shifts), so an integer shift reproduces the pixels (reflected at the border) up to rounding. A
quarter turn does not exactly: ``sym6`` is not symmetric, so turning the fine grid mixes up the
two filters' directions (about 2% of the range on a smooth blob, 10% on white noise; EDM alike,
and CIFAR-10's preset has no rotation anyway). Unlike EDM, the reflection margin is the one the
transformed images need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SYM6", "affine_resample"]

# Daubechies symlet-6 low-pass decomposition filter (the filter EDM resamples with).
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)


# ---- 3x3 homogeneous matrices, batched over images: (N, 3, 3) ----


def _affine(a, b, c, d, e, f) -> torch.Tensor:
    """[[a, b, c], [d, e, f], [0, 0, 1]] from (N,) tensors (or numbers broadcast to them)."""
    ref = next(v for v in (a, b, c, d, e, f) if torch.is_tensor(v))
    cols = [v if torch.is_tensor(v) else torch.full_like(ref, float(v)) for v in (a, b, c, d, e, f)]
    top = torch.stack(cols, dim=-1).reshape(*ref.shape, 2, 3)
    last = torch.zeros(*ref.shape, 1, 3, dtype=ref.dtype, device=ref.device)
    last[..., 0, 2] = 1
    return torch.cat([top, last], dim=-2)


def _shift(tx, ty) -> torch.Tensor:
    return _affine(1, 0, tx, 0, 1, ty)


def _scaling(sx, sy) -> torch.Tensor:
    return _affine(sx, 0, 0, 0, sy, 0)


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return _affine(c, -s, 0, s, c, 0)


def _const(fn, *args, device) -> torch.Tensor:
    """A single (3, 3) matrix from numbers."""
    return fn(*(torch.tensor([float(a)], device=device) for a in args))[0]


# ---- resampling ----


def _fir(x: torch.Tensor, taps: torch.Tensor, dim: int, padding: int, stride: int) -> torch.Tensor:
    """Correlate every channel of ``x`` (N, C, H, W) with ``taps`` along ``dim`` (2 or 3)."""
    C = x.shape[1]
    if dim == 3:
        weight, pad, step = taps.view(1, 1, 1, -1), (0, padding), (1, stride)
    else:
        weight, pad, step = taps.view(1, 1, -1, 1), (padding, 0), (stride, 1)
    return F.conv2d(x, weight.expand(C, -1, -1, -1), stride=step, padding=pad, groups=C)


def _upsample2(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zeros between samples, then the (reversed) low-pass filter; L -> 2L."""
    for dim in (3, 2):
        shape = list(x.shape)
        shape[dim] = 2 * shape[dim] - 1
        z = x.new_zeros(shape)
        index = [slice(None)] * 4
        index[dim] = slice(None, None, 2)
        z[tuple(index)] = x
        x = _fir(z, taps.flip(0), dim, padding=(len(taps) + 1) // 2, stride=1)
    return x


def _downsample2(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """2x downsampling: the low-pass filter at stride 2; 2L -> L."""
    for dim in (3, 2):
        x = _fir(x, taps, dim, padding=(len(taps) - 1) // 2, stride=2)
    return x


def affine_resample(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Warp ``images`` (N, C, H, W) by per-image inverse maps ``g_inv`` (N, 3, 3) as EDM does.

    ``g_inv`` maps an output pixel position to the input position it reads from, both in pixel
    units centred on the image (the centre of the image is (0, 0), x right, y down). Outside the
    image the input is reflected (without repeating the edge pixel).
    """
    N, C, H, W = images.shape
    dev, dtype = images.device, images.dtype
    x = images.float()
    g = g_inv.to(device=dev, dtype=torch.float32)
    taps = torch.tensor(SYM6, dtype=torch.float32, device=dev)
    pad = len(taps) // 4
    cx, cy = (W - 1) / 2, (H - 1) / 2

    # Reflection margin: where the output corners read from, plus room for the filter.
    corners = torch.tensor(
        [[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], dtype=torch.float32, device=dev
    )
    reach = g @ corners  # (N, 3, 4)
    xs, ys = reach[:, 0].flatten(), reach[:, 1].flatten()
    need = torch.stack([(-xs).max(), (-ys).max(), xs.max(), ys.max()])
    need = need + torch.tensor([2 * pad - cx, 2 * pad - cy] * 2, device=dev)
    limit = torch.tensor([W - 1, H - 1] * 2, dtype=torch.float32, device=dev)
    left, top, right, bottom = (int(v) for v in need.clamp(min=0).minimum(limit).ceil().tolist())
    x = F.pad(x, [left, right, top, bottom], mode="reflect")
    g = _const(_shift, (left - right) / 2, (top - bottom) / 2, device=dev) @ g

    # Upsample 2x and express the map on the fine grid.
    x = _upsample2(x, taps)
    g = _const(_scaling, 2, 2, device=dev) @ g @ _const(_scaling, 0.5, 0.5, device=dev)
    g = _const(_shift, -0.5, -0.5, device=dev) @ g @ _const(_shift, 0.5, 0.5, device=dev)

    # Bilinear sampling on the fine grid of the (padded by `pad`) output.
    out_h, out_w = (H + 2 * pad) * 2, (W + 2 * pad) * 2
    theta = (
        _const(_scaling, 2 / x.shape[3], 2 / x.shape[2], device=dev)
        @ g
        @ _const(_scaling, out_w / 2, out_h / 2, device=dev)
    )
    grid = F.affine_grid(theta[:, :2, :], [N, C, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Downsample 2x and crop the filter's border.
    x = _downsample2(x, taps)[:, :, pad:-pad, pad:-pad]
    return x.to(dtype)
