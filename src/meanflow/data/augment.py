"""EDM's geometric augmentation pipeline with augmentation labels, written for this project.

Source of the semantics: ``training/augment.py`` (``AugmentPipe``) of NVlabs/edm (Karras et al.
2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), itself after
StyleGAN2-ADA. The MeanFlow authors' PyTorch port (Gsunshine/py-meanflow) uses the same class.

Each transformation is applied to an image independently with probability ``p * multiplier``
(capped at 1), in this order, all geometric steps composed into one affine map per image:

==============  ==========================================================  ====================
transformation  parameter draw                                              label entries
==============  ==========================================================  ====================
xflip           coin w in {0, 1}; mirror left-right when w = 1              0: w
yflip           coin w in {0, 1}; mirror top-bottom when w = 1              1: w
scale           w ~ N(0, 1); isotropic scale s = 2^(w * scale_std)          2: w
rotate_frac     w ~ U(-pi, pi) * rotate_frac_max; rotate by w               3: cos w - 1, 4: sin w
aniso           w ~ N(0, 1), s = 2^(w * aniso_std): x * s, y / s, along a    5: w cos r, 6: w sin r
                frame rotated by r ~ U(-pi, pi) (r = 0 w.p. 1 - 0.5)
translate_frac  (wx, wy) ~ N(0, 1); shift by (wx W, wy H) * translate_std   7: wx, 8: wy
==============  ==========================================================  ====================

An entry is exactly 0 when its transformation was not applied (or is switched off), so the
labels are zero for an untouched image and such an image is returned bit for bit. The labels
always have the nine columns above, EDM's CIFAR-10 layout (``augment_dim = 9``); a switched-off
transformation keeps its columns at zero (EDM and the MeanFlow port drop them instead: the
port's six-column vector equals columns 0, 2, 5, 6, 7, 8 here).

Resampling is EDM's (:func:`.warp.affine_resample`). Unlike EDM, images whose map is the
identity skip the resampling (EDM resamples the whole batch, adding ~1e-7 rounding noise).
Integer blits (``rotate_int``, ``translate_int``) and EDM's colour transformations are not
implemented: neither EDM's CIFAR-10 setting nor the MeanFlow authors' uses them.

Randomness comes only from the ``torch.Generator`` passed to the call, drawn in EDM's order on
the generator's device, so a CPU generator seeded like ``torch.manual_seed`` gives the same draws
as EDM on CPU, and a training run that saves the generator state resumes exactly.
"""

from __future__ import annotations

import math

import torch

from ..errors import MeanFlowError, check
from .warp import SYM6, _rotation, _scaling, _shift, affine_resample

LABEL_NAMES = (
    "xflip",
    "yflip",
    "scale",
    "rotate_cos_minus_1",
    "rotate_sin",
    "aniso_cos",
    "aniso_sin",
    "translate_x",
    "translate_y",
)
LABEL_DIM = len(LABEL_NAMES)

# Named settings (keyword arguments of AugmentPipe).
AUGMENT_CONFIGS: dict[str, dict] = {
    # No augmentation.
    "none": dict(p=0.0),
    # The MeanFlow authors' CIFAR-10 setting (py-meanflow meanflow/training/train_loop.py): EDM's
    # pipeline with y-flips and rotations off; they also flip the dataset left-right (hflip).
    "edm-cifar10": dict(
        p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1
    ),
    # EDM's own CIFAR-10 setting (NVlabs/edm train.py, --augment 0.12).
    "edm-original": dict(
        p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1
    ),
}


def augment_config(name: str) -> dict:
    """The keyword arguments of :class:`AugmentPipe` for a named setting (a fresh dict)."""
    if name not in AUGMENT_CONFIGS:
        raise MeanFlowError(
            f"unknown augmentation {name!r}: use one of {', '.join(AUGMENT_CONFIGS)}"
        )
    return dict(AUGMENT_CONFIGS[name])


# ---- the pipeline ----


class AugmentPipe:
    """EDM's geometric augmentations; ``pipe(images, generator) -> (images, labels (N, 9))``.

    Args:
        p: overall probability; each transformation fires with probability
            ``min(1, p * multiplier)`` per image.
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: probability multipliers
            (0 = off; EDM's ``xflip=1e8`` makes the flip coin always tossed, so half the images
            are mirrored).
        scale_std: log2 standard deviation of isotropic scaling.
        rotate_frac_max: range of rotation, 1 = full circle.
        aniso_std: log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob: probability that anisotropic scaling uses a rotated frame.
        translate_frac_std: standard deviation of translation, relative to the image size.
    """

    def __init__(
        self,
        p: float = 0.12,
        *,
        xflip: float = 0,
        yflip: float = 0,
        scale: float = 0,
        rotate_frac: float = 0,
        aniso: float = 0,
        translate_frac: float = 0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ) -> None:
        check(0 <= p <= 1, f"augmentation probability p must be in [0, 1], not {p}")
        mults = dict(
            xflip=xflip,
            yflip=yflip,
            scale=scale,
            rotate_frac=rotate_frac,
            aniso=aniso,
            translate_frac=translate_frac,
        )
        for name, value in mults.items():
            check(
                value >= 0 and math.isfinite(value),
                f"augmentation multiplier {name} must be a finite number >= 0, not {value}",
            )
        check(
            0 <= aniso_rotate_prob <= 1,
            f"aniso_rotate_prob must be in [0, 1], not {aniso_rotate_prob}",
        )
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @classmethod
    def from_config(cls, name: str) -> AugmentPipe:
        """The pipeline of a named setting (see :data:`AUGMENT_CONFIGS`)."""
        return cls(**augment_config(name))

    def config(self) -> dict:
        """The constructor's keyword arguments (JSON-serializable)."""
        keys = (
            "p",
            "xflip",
            "yflip",
            "scale",
            "rotate_frac",
            "aniso",
            "translate_frac",
            "scale_std",
            "rotate_frac_max",
            "aniso_std",
            "aniso_rotate_prob",
            "translate_frac_std",
        )
        return {k: getattr(self, k) for k in keys}

    @property
    def active_labels(self) -> tuple[int, ...]:
        """Indices of the label columns that can be nonzero (the others are always 0)."""
        on = [
            self.xflip,
            self.yflip,
            self.scale,
            self.rotate_frac,
            self.rotate_frac,
            self.aniso,
            self.aniso,
            self.translate_frac,
            self.translate_frac,
        ]
        return tuple(i for i, m in enumerate(on) if m > 0)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.config().items())
        return f"AugmentPipe({args})"

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        *,
        total: int | None = None,
        part: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` are rows ``part`` of a batch of ``total`` (default: the whole batch):
        every random number is drawn for all ``total`` rows and sliced, so a row is augmented
        the same way whatever the number of processes (data-parallel training)."""
        check(
            images.ndim == 4,
            f"augmentation needs images (N, C, H, W), not shape {tuple(images.shape)}",
        )
        N, _, H, W = images.shape
        dev = images.device
        gdev = generator.device
        total = N if total is None else total

        def rand(*shape):  # shape ends with N: drawn for all rows, this part kept
            return torch.rand((*shape[:-1], total), generator=generator, device=gdev)[..., part].to(
                dev
            )

        def randn(*shape):
            return torch.randn((*shape[:-1], total), generator=generator, device=gdev)[
                ..., part
            ].to(dev)

        def coin():
            return torch.randint(2, (total,), generator=generator, device=gdev)[part].to(dev)

        def fires(mult):  # per image: does this transformation apply?
            return rand(N) < mult * self.p

        labels = torch.zeros(N, LABEL_DIM, dtype=torch.float32, device=dev)
        zero = torch.zeros(N, dtype=torch.float32, device=dev)
        out = images

        # Pixel blits.
        for col, mult, dim in ((0, self.xflip, 3), (1, self.yflip, 2)):
            if mult > 0:
                w = coin()  # EDM's order: the coin, then whether the flip fires
                w = torch.where(fires(mult), w, torch.zeros_like(w))
                out = torch.where((w == 1)[:, None, None, None], out.flip(dim), out)
                labels[:, col] = w.float()

        # Geometric parameters, composed into one inverse map (output -> input position).
        g_inv = torch.eye(3, device=dev).expand(N, 3, 3)
        geometric = False
        if self.scale > 0:
            w = randn(N)
            w = torch.where(fires(self.scale), w, zero)
            s = torch.exp2(w * self.scale_std)
            g_inv = g_inv @ _scaling(1 / s, 1 / s)
            labels[:, 2] = w
            geometric = True
        if self.rotate_frac > 0:
            w = (rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max)
            w = torch.where(fires(self.rotate_frac), w, zero)
            g_inv = g_inv @ _rotation(w)
            labels[:, 3], labels[:, 4] = w.cos() - 1, w.sin()
            geometric = True
        if self.aniso > 0:
            w = randn(N)
            r = (rand(N) * 2 - 1) * math.pi
            w = torch.where(fires(self.aniso), w, zero)
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, zero)
            s = torch.exp2(w * self.aniso_std)
            g_inv = g_inv @ _rotation(-r) @ _scaling(1 / s, s) @ _rotation(r)
            labels[:, 5], labels[:, 6] = w * r.cos(), w * r.sin()
            geometric = True
        if self.translate_frac > 0:
            w = randn(2, N)
            w = torch.where(rand(1, N) < self.translate_frac * self.p, w, zero)
            tx, ty = w[0] * (W * self.translate_frac_std), w[1] * (H * self.translate_frac_std)
            g_inv = g_inv @ _shift(-tx, -ty)
            labels[:, 7], labels[:, 8] = w[0], w[1]
            geometric = True

        if geometric:
            # Resample the images some geometric step moved (a nonzero label; an aniso frame
            # rotation with w = 0 is the identity up to rounding and is skipped).
            moved = labels[:, 2:].ne(0).any(dim=1).nonzero()[:, 0]
            if len(moved):
                out = out.clone()
                out[moved] = affine_resample(out[moved], g_inv[moved])
        return out, labels


__all__ = [
    "AugmentPipe",
    "affine_resample",
    "augment_config",
    "AUGMENT_CONFIGS",
    "LABEL_NAMES",
    "LABEL_DIM",
    "SYM6",
]
