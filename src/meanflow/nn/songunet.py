"""The MeanFlow authors' CIFAR-10 DDPM++ U-Net: ``model(z, r, t, y=None, aug=None)``.

Source: the authors' PyTorch code (Gsunshine/py-meanflow, ``meanflow/models/unet.py`` and
``model_configs.py``), itself NVlabs/edm's ``SongUNet`` (a re-implementation of DDPM++/NCSN++ of
Song et al., score_sde) with two time inputs. Written anew here; the numbers follow their config:

* Encoder: Conv3x3 to ``model_channels`` (128), then per level (``channel_mult`` (2, 2, 2):
  32 -> 16 -> 8 at 256 channels) a down-sampling ResNet block (levels > 0) and ``num_blocks`` (4)
  ResNet blocks, self-attention (one head) in the blocks at 16x16. Decoder: at the lowest level
  a block with attention and one without, elsewhere an up-sampling block; then ``num_blocks + 1``
  blocks per level, each fed the matching encoder activation concatenated on channels, attention
  in the last block of the 16x16 level. Output: GroupNorm-SiLU-Conv3x3 ("standard" encoder and
  decoder: no progressive input/output branches).
* ResNet block: GroupNorm-SiLU-[resample]-Conv3x3, plus ``Linear(emb)`` added to the activations
  (additive conditioning, EDM's ``adaptive_scale=False``: no scale-shift), GroupNorm-SiLU-Dropout-
  Conv3x3; the skip path is [resample]-Conv1x1 when the shape changes (``resample_proj``); the sum
  is multiplied by sqrt(1/2), and again after the residual attention. Resampling is the FIR filter
  (1, 3, 3, 1) (outer product, normalized; NCSN++'s), depthwise, stride 2.
* GroupNorm: min(32, C // 4) groups, eps 1e-6. Init: Xavier-uniform everywhere, biases zero,
  attention qkv scaled by sqrt(0.2), the last conv of each block, the attention projection and
  the output conv scaled by 1e-5 (near-zero output at init, not exactly zero).
* Time: ``t`` and ``h = t - r`` as they are (t in [0, 1], t = 1 noise; no x1000), each through
  the positional embedding of ``model_channels * channel_mult_noise`` (256) features
  ``[sin(f_k s), cos(f_k s)]``, ``f_k = 10000^(-k / (n/2 - 1))`` (from 1 down to exactly 1e-4);
  the two are concatenated (512), the augmentation labels ``Linear(aug)`` (no bias) are added,
  then a shared SiLU(Linear)-SiLU(Linear) mapping to ``model_channels * channel_mult_emb`` (512).
  Labels (not used by the authors): a table of ``num_classes + 1`` rows added at the same place,
  the last row the null label, used when ``y`` is None.

The authors' CIFAR-10 network (``augment_dim`` 6: x-flip, scale, anisotropy (2), translation (2)
labels of their EDM augmentation pipe with y-flip and rotation off) has 55,932,419 parameters,
55,929,347 without augmentation labels (EDM's 9 labels: 55,933,955). ``aug`` comes in EDM's
nine-column layout (:mod:`meanflow.data.augment`); the network reads columns 0, 2, 5, 6, 7, 8.
Parameter names are EDM's, so the authors' state dicts load unchanged.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check
from .attention import attention
from .embeddings import check_image_call, check_unet_args, resolve_config
from .forward_mode import Conv2d, GroupNorm, Linear, silu

#: channels, multipliers per level, blocks per level, attention at ``input_size // d`` for each
#: ``d`` in ``attention_downsample``, dropout, time-embedding width factor, augmentation labels.
SONGUNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_channels=16,
        channel_mult=(1, 2),
        num_blocks=1,
        attention_downsample=(2,),
        dropout=0.1,
        channel_mult_noise=1,
        augment_dim=0,
    ),
    "cifar10-paper": dict(
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_blocks=4,
        attention_downsample=(2,),
        dropout=0.2,
        channel_mult_noise=2,
        augment_dim=6,
        augment_columns=(0, 2, 5, 6, 7, 8),
    ),
}

SKIP_SCALE = math.sqrt(0.5)
#: columns of EDM's augmentation labels (meanflow.data.augment; xflip, yflip, scale, rotation (2),
#: anisotropy (2), translation (2)); the authors' pipe keeps 0, 2, 5, 6, 7, 8 (no yflip, rotation).
EDM_LABELS = 9


_Layer = TypeVar("_Layer", nn.Linear, nn.Conv2d)


def _init(layer: _Layer, gain: float = 1.0) -> _Layer:
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    return _init(Conv2d(cin, cout, kernel, padding=kernel // 2), gain)


def _norm(channels: int) -> nn.GroupNorm:
    groups = min(32, channels // 4)
    check(
        groups >= 1 and channels % groups == 0,
        f"SongUNet: {channels} channels cannot be "
        f"split into min(32, C // 4) = {groups} GroupNorm groups; pick other channel counts",
    )
    return GroupNorm(groups, channels, eps=1e-6)


def _resample(x: torch.Tensor, fir: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Depthwise FIR down- or up-sampling by 2 (``fir`` is the normalized 2-D filter)."""
    if mode is None:
        return x
    c, k = x.shape[1], fir.shape[-1]
    weight = fir.to(x.dtype).expand(c, 1, k, k)
    if mode == "down":
        return F.conv2d(x, weight, stride=2, padding=(k - 1) // 2, groups=c)
    return F.conv_transpose2d(x, 4 * weight, stride=2, padding=(k - 1) // 2, groups=c)


class SongBlock(nn.Module):
    """ResNet block with additive conditioning, optional resampling and self-attention."""

    fir: torch.Tensor  # a buffer (register_buffer)

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int,
        dropout: float,
        fir: torch.Tensor,
        resample: str | None = None,
        attention: bool = False,
    ) -> None:
        super().__init__()
        self.resample, self.attention = resample, attention
        self.register_buffer("fir", fir.clone(), persistent=False)
        self.norm0 = _norm(cin)
        self.conv0 = _conv(cin, cout, 3)
        self.affine = _init(Linear(emb_dim, cout))
        self.norm1 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(cout, cout, 3, gain=1e-5)
        self.skip = _conv(cin, cout, 1) if cin != cout or resample else None
        if attention:
            self.norm2 = _norm(cout)
            self.qkv = _conv(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = _conv(cout, cout, 1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(silu(self.norm0(x)), self.fir, self.resample))
        h = silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        if self.skip is not None:
            x = self.skip(_resample(x, self.fir, self.resample))
        x = (h + x) * SKIP_SCALE
        if self.attention:
            b, c, hgt, wid = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(b, 3, 1, c, hgt * wid)
            q, k, v = qkv.transpose(-1, -2).unbind(1)
            a = attention(q, k, v)  # (B, 1, HW, C), one head
            a = a.transpose(-1, -2).reshape(b, c, hgt, wid).contiguous()  # (forward AD of
            x = (self.proj(a) + x) * SKIP_SCALE  # GroupNorm needs it contiguous)
        return x


class SongUNet(nn.Module):
    """See the module docstring. Parameter names are EDM's (``map_layer0``, ``enc.32x32_conv``,
    ``dec.16x16_block4.qkv``, ``dec.32x32_aux_conv``, ...), so py-meanflow weights load as they
    are (:func:`songunet_for_authors`). ``augment_columns``: the columns of the (B, 9) EDM label
    layout (``meanflow.data.augment``) that the network reads; None: ``aug`` is (B, augment_dim)."""

    freqs: torch.Tensor  # a buffer (register_buffer)

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 32,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        channel_mult_noise: int = 2,
        channel_mult_emb: int = 4,
        resample_filter: tuple[int, ...] = (1, 3, 3, 1),
        num_classes: int = 0,
        augment_dim: int = 0,
        augment_columns: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        check_unet_args(
            in_channels,
            input_size,
            model_channels,
            channel_mult,
            num_blocks,
            dropout,
            "model_channels",
            "num_blocks",
        )
        check(
            num_classes >= 0 and augment_dim >= 0,
            f"num_classes and augment_dim must be >= 0, got {num_classes}, {augment_dim}",
        )
        if augment_columns is not None:
            augment_columns = tuple(augment_columns)
            check(
                len(augment_columns) == augment_dim
                and all(0 <= c < EDM_LABELS for c in augment_columns),
                f"augment_columns "
                f"{augment_columns} must be {augment_dim} indices in [0, {EDM_LABELS})",
            )
        noise = model_channels * channel_mult_noise
        check(
            noise >= 4 and noise % 2 == 0,
            f"the time embedding width model_channels x "
            f"channel_mult_noise = {noise} must be even and >= 4",
        )
        levels = len(channel_mult)
        check(
            input_size % 2 ** (levels - 1) == 0,
            f"input_size {input_size} is not divisible by 2^{levels - 1} ({levels} levels from "
            f"channel_mult {channel_mult}); use fewer levels",
        )
        sizes = [input_size >> i for i in range(levels)]
        missing = [a for a in attention_resolutions if a not in sizes]
        check(
            not missing,
            f"attention resolutions {missing} are not among the level "
            f"resolutions {sizes} of a {input_size}x{input_size} input",
        )
        self.in_channels, self.input_size = in_channels, input_size
        self.num_classes, self.augment_dim = num_classes, augment_dim
        self.augment_columns = augment_columns
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = (torch.outer(f, f) / f.sum() ** 2)[None, None]
        half = noise // 2
        freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
        self.register_buffer("freqs", freqs.float(), persistent=False)

        emb_dim = model_channels * channel_mult_emb
        self.map_augment = (
            _init(Linear(augment_dim, 2 * noise, bias=False)) if augment_dim else None
        )
        self.label = nn.Embedding(num_classes + 1, 2 * noise) if num_classes else None
        self.map_layer0 = _init(Linear(2 * noise, emb_dim))
        self.map_layer1 = _init(Linear(emb_dim, emb_dim))

        def block(cin, cout, **kw):
            return SongBlock(cin, cout, emb_dim, dropout, fir, **kw)

        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout, skips = model_channels, [model_channels]
        for level, mult in enumerate(channel_mult):
            res = f"{sizes[level]}x{sizes[level]}"
            if level == 0:
                self.enc[f"{res}_conv"] = _conv(in_channels, model_channels, 3)
            else:
                self.enc[f"{res}_down"] = block(cout, cout, resample="down")
                skips.append(cout)
            for i in range(num_blocks):
                self.enc[f"{res}_block{i}"] = block(
                    cout, model_channels * mult, attention=sizes[level] in attention_resolutions
                )
                cout = model_channels * mult
                skips.append(cout)
        for level in reversed(range(levels)):
            res = f"{sizes[level]}x{sizes[level]}"
            if level == levels - 1:
                self.dec[f"{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}_up"] = block(cout, cout, resample="up")
            for i in range(num_blocks + 1):  # "block" entries take an encoder activation
                attn = i == num_blocks and sizes[level] in attention_resolutions
                self.dec[f"{res}_block{i}"] = block(
                    cout + skips.pop(), model_channels * channel_mult[level], attention=attn
                )
                cout = model_channels * channel_mult[level]
        self.dec[f"{res}_aux_norm"] = _norm(cout)
        self.dec[f"{res}_aux_conv"] = _conv(cout, in_channels, 3, gain=1e-5)

    def time_features(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[sin(f t), cos(f t), sin(f (t - r)), cos(f (t - r))]``: (B,) x 2 -> (B, 2 * noise)."""
        f = self.freqs.to(t.dtype)
        parts = []
        for s in (t, t - r):
            angles = s[:, None] * f
            parts += [angles.sin(), angles.cos()]
        return torch.cat(parts, dim=1)

    def forward(
        self,
        z: torch.Tensor,
        r: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        aug: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_image_call("SongUNet", z, r, t, y, self.in_channels, self.input_size)
        emb = self.time_features(r.to(z.dtype), t.to(z.dtype))
        if aug is not None:
            cols = self.augment_columns
            want = (z.shape[0], EDM_LABELS if cols is not None else self.augment_dim)
            check(
                self.map_augment is not None and tuple(aug.shape) == want,
                f"aug must have shape {want} for this SongUNet (augment_dim="
                f"{self.augment_dim}), got {tuple(aug.shape)}",
            )
            assert self.map_augment is not None  # check() raised otherwise
            aug = aug[:, list(cols)] if cols is not None else aug
            emb = emb + self.map_augment(aug.to(z.dtype))
        if self.label is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long)
            emb = emb + self.label(y)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        skips, x = [], z
        for layer in self.enc.values():  # the first is the input conv, the rest SongBlocks
            x = layer(x, emb) if isinstance(layer, SongBlock) else layer(x)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = layer(torch.cat([x, skips.pop()], dim=1), emb)
            elif isinstance(layer, SongBlock):
                x = layer(x, emb)
            elif name.endswith("aux_norm"):
                x = silu(layer(x))
            else:
                x = layer(x)
        return x


def songunet(
    name: str, in_channels: int = 3, input_size: int = 32, num_classes: int = 0, **overrides
) -> SongUNet:
    """Build a SongUNet by name (see :data:`SONGUNET_CONFIGS`); keywords override the config.
    Pass ``attention_resolutions`` (absolute sizes) or ``attention_downsample`` (factors)."""
    cfg = resolve_config(SONGUNET_CONFIGS, name, "SongUNet", input_size, overrides)
    if "augment_dim" in overrides and "augment_columns" not in overrides:
        cfg["augment_columns"] = None  # a new width: aug of shape (B, augment_dim)
    return SongUNet(in_channels=in_channels, input_size=input_size, num_classes=num_classes, **cfg)


def songunet_for_authors(state: dict[str, torch.Tensor]) -> tuple[SongUNet, tuple, dict]:
    """The ``cifar10-paper`` SongUNet that fits a py-meanflow state dict (prefix removed):
    ``(model, (3, 32, 32), {"arch": "songunet", "size": "cifar10-paper"})``. Removes from
    ``state``, in place, EDM's ``resample_filter`` buffers (constants we rebuild); without
    ``map_augment.weight`` (not stored, or dropped) the model has no augmentation mapping."""
    for key in [k for k in state if k.endswith("resample_filter")]:
        del state[key]
    aug = state.get("map_augment.weight")
    model = songunet("cifar10-paper", 3, 32, augment_dim=aug.shape[1] if aug is not None else 0)
    return model, (3, 32, 32), {"arch": "songunet", "size": "cifar10-paper"}
