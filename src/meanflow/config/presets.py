"""Named presets: dotted overrides on the :class:`TrainConfig` defaults, with their sources.

Sources: the MeanFlow paper (arXiv 2505.13447, Sec. 5 and appendix tables) and the authors'
PyTorch CIFAR-10 code (py-meanflow, its ``cifar10`` training script); our own CPU presets were
chosen by measurement (docs/benchmarks.md). Where a value is ours, the comment says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MeanFlowError
from .overrides import _suggest, set_value
from .schema import TrainConfig

# The authors' ImageNet 256x256 latent recipe (paper Sec. 5.1, appendix Table 4): SD-VAE latents
# 32x32x4, batch 256, Adam (0.9, 0.95), constant lr 1e-4, EMA 0.9999, 25% r != t,
# logit-normal(-0.4, 1.0), adaptive weight p = 1 with c = 0.01 (their `norm_eps`), 10% label
# dropout on r = t rows, 240 epochs (the authors' run_b4.yml; the paper's ablations train B/4 for
# 80). An epoch is 5,004 steps: 1,281,167 // 256 (their DataLoader drops the last batch). No
# flips: their latents are encoded from the centre crop alone and their LatentDataset returns the
# stored latent unflipped (utils/data_util.py, utils/vae_util.py); float32 (default.py
# half_precision False).
_IMAGENET = {
    "model.arch": "dit",
    "data_shape": "4x32x32",
    "num_classes": 1000,
    "batch_size": 256,
    "optim.lr": 1e-4,
    "optim.schedule": "constant",
    "optim.beta1": 0.9,
    "optim.beta2": 0.95,
    "ema_decay": 0.9999,
    "time.ratio": 0.25,
    "time.mean": -0.4,
    "time.std": 1.0,
    "loss.p": 1.0,
    "guidance.label_dropout": 0.1,
    "loss.c": 0.01,
    "ema_warmup": False,
    "hflip": False,
    "precision": "fp32",
    "steps": 1_200_960,  # 240 epochs x 5,004
    "log_every": 100,
    "ckpt_every": 10_000,
    "grid_every": 10_000,
}
_B2_GUIDANCE = {"guidance.omega": 1.0, "guidance.kappa": 0.5}
# Table 1 (a-e) trains without guidance (their guidance_eq 'none': v~ = v, labels still dropped)
_NO_GUIDANCE = {"guidance.omega": 1.0, "guidance.kappa": 0.0}

# Improved MeanFlow as its authors train it (Lyy-iiis/imeanflow: configs/default.py,
# configs/train_config.yml, imf.py, models/imfDiT.py): iMF-B/2 with the auxiliary velocity head
# branching the last 8 of 12 blocks, guidance scale and interval as network inputs (omega
# log-uniform on [1, 1 + s_max], s_max = 7; t_min ~ U(0, 0.5), t_max ~ U(0.5, 1)), 50% of rows
# r = t (data_proportion 0.5), logit-normal(-0.4, 1.0), norm_p 1, norm_eps 0.01, 10% label
# dropout; batch 1024, lr 1e-4 with 10 warm-up epochs then constant, Adam b2 0.95, constant EMA
# 0.9999, float32, no flips (their LatentDataset stores use_flip and never reads it); 640 epochs
# of 1,251 steps (1,281,167 // 1024, drop_last). Our DiT differs in its blocks and
# conditioning (docs/method.md, "iMF: ours vs the authors'").
_IMF_EPOCH = 1_281_167 // 1024
_IMF_B2 = {
    **_IMAGENET,
    "objective": "imf",
    "model.size": "B/2",
    "model.aux_head": True,
    "model.aux_depth": 8,
    "guidance.inputs": True,
    "guidance.omega_max": 8.0,
    "time.ratio": 0.5,
    "batch_size": 1024,
    "optim.warmup": 10 * _IMF_EPOCH,
    "steps": 640 * _IMF_EPOCH,
}

# The authors' CIFAR-10 recipe (py-meanflow): unconditional DDPM++ U-Net (their SongUNet,
# 55.9M; model.arch=songunet), batch 1024, lr 6e-4 with 200 warm-up epochs, Adam (0.9, 0.999),
# p = 0.75, 75% r != t, dropout 0.2, 16,000 epochs of 48 steps (8 GPUs x 128: 6,250 images
# per GPU // 128, last batch dropped): 768,000 steps.
_CIFAR = {
    "model.arch": "songunet",
    "model.size": "cifar10-paper",
    "model.dropout": 0.2,
    "data_shape": "3x32x32",
    "conditional": False,
    "batch_size": 1024,
    "optim.lr": 6e-4,
    "optim.warmup": 9_600,
    "optim.beta1": 0.9,
    "optim.beta2": 0.999,
    "loss.p": 0.75,
    "time.ratio": 0.75,
    "steps": 768_000,
    # three EMAs every 16 steps with decay^16, no warm-up (their models/ema.py); sampling
    # uses 0.99995, the copy their demo reports FID with
    "ema_decay": 0.99995,
    "ema_extra": "0.9999,0.9996",
    "ema_every": 16,
    "ema_warmup": False,
    # EDM's augmentation at p = 0.12 with y-flips and rotations off, its labels fed to
    # the network (train_loop.py), plus a plain random flip (data_transform.py)
    "augment": "edm-cifar10",
    "augment_p": 0.12,
    "hflip": True,
    "log_every": 100,
    "ckpt_every": 10_000,
    "grid_every": 10_000,
}

# Our CPU image presets (measured in docs/benchmarks.md): a U-Net of 16 base channels, one
# ResBlock per level, t ~ LN(-0.6, 1.6) as in the improved CIFAR recipe but r ~ LN(-2, 2) (the
# original recipe's r; r ~ LN(-4, 1.6) left the two-step sampler's pair (0.5, 1) almost untrained
# and measured worse at 1, 2 and 4 steps: docs/benchmarks.md section 5), guidance of scale 2.
_CPU_IMAGES = {
    "model.arch": "unet",
    "model.size": "small",
    "model.channels": 16,
    "model.blocks": 1,
    "batch_size": 64,
    "optim.lr": 1e-3,
    "optim.schedule": "cosine",
    "optim.warmup": 100,
    "ema_decay": 0.999,
    "time.mean": -0.6,
    "time.std": 1.6,
    "time.r_mean": -2.0,
    "time.r_std": 2.0,
    "time.ratio": 0.5,
    "loss.p": 0.75,
    "guidance.omega": 1.0,
    "guidance.kappa": 0.5,
    "log_every": 25,
    "ckpt_every": 500,
    "grid_every": 500,
}

# 2-D toy data on 2 CPU cores in under 3 minutes (tuned by benchmarks/toy_quality.py): the
# authors' improved CIFAR-10 times, plain squared error (p = 0), cosine lr. time.mix: 3 of 4
# rows draw (r, t) uniformly on the triangle instead: r ~ LN(-4, 1.6) alone almost never
# trains the pairs of the 2- and 4-step samplers (r >= 0.5), whose SWD was 2-3x the 1-step
# one. model.time_input t,r: the MLP sees (t, r), not (t, t - r): 1-step SWD about 0.6x on
# the same sets. Both chosen on 2-D sets outside the built-ins, checked on others
# (docs/onestep.md).
_TOY: dict[str, Any] = {
    "batch_size": 1024,
    "model.hidden": 256,
    "model.depth": 4,
    "model.time_input": "t,r",
    "optim.lr": 1e-3,
    "optim.schedule": "cosine",
    "ema_decay": 0.999,
    "time.mean": -0.6,
    "time.std": 1.6,
    "time.r_mean": -4.0,
    "time.r_std": 1.6,
    "time.ratio": 0.75,
    "time.ratio_start": 0.25,  # r != t share 25% -> 75%: the velocity first (onestep.md f)
    "time.mix": 0.75,
    "loss.p": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The library defaults: the paper's ImageNet times (25% r != t, LN(-0.4, 1)), p = 1,
    # constant lr.
    "mlp": {},
    # 2-D data: the recipe above, 9,700 steps.
    "toy-2d": {**_TOY, "steps": 9700},
    # Vectors of any other dimension: the same recipe at the default 5,000 steps. On 8-D and
    # 32-D Gaussian mixtures one-step SWD 0.06 / 0.04 against the plain "mlp" settings' 0.53 /
    # 0.27 (docs/onestep.md, "(g) Beyond 2-D").
    "vectors": {**_TOY, "steps": 5000},
    # A few-second smoke run (tests, CI).
    "tiny": {
        "steps": 50,
        "batch_size": 128,
        "model.hidden": 32,
        "model.depth": 2,
        "num_data": 2000,
        "log_every": 10,
        "ckpt_every": 25,
        "sample_num": 500,
    },
    "fashion-mnist-small": {
        **_CPU_IMAGES,
        "data": "fashion-mnist",
        "data_shape": "1x28x28",
        "num_classes": 10,
        "steps": 3000,
        # r != t share 0% -> 50%, the velocity first: 1-/2-step FD 5.90/3.95 against 6.37/4.92
        # (seeds 0, 1) at equal compute (docs/benchmarks.md section 5, "Seeds at equal compute")
        "time.ratio_start": 0.0,
    },
    "digits-small": {
        **_CPU_IMAGES,
        "data": "digits",
        "data_shape": "1x16x16",
        "num_classes": 10,
        "steps": 2000,
        # guidance w' = 0.5 / (1 - 0.5) = 1 (kappa's self-mixing kept): FD-digits 1 / 2-step
        # 0.11 / 0.12 against 0.72 / 0.80 at w' = 2 (docs/benchmarks.md, "Digits: the guidance
        # scale")
        "guidance.omega": 0.5,
        # the fixed r != t share: Fashion-MNIST's schedule (time.ratio_start=0) was 37% worse
        # at one step here, three seeds (docs/benchmarks.md, "Digits at w' = 1")
    },
    # Any other images: the small U-Net sized to the data.
    "unet-small": {**_CPU_IMAGES, "steps": 3000},
    "cifar10-paper": {**_CIFAR, "time.mean": -2.0, "time.std": 2.0},
    "cifar10-paper-improved": {
        **_CIFAR,
        "time.mean": -0.6,
        "time.std": 1.6,
        "time.r_mean": -4.0,
        "time.r_std": 1.6,
        "time.order": "official-v1",
    },
    "imagenet256-b4": {**_IMAGENET, **_B2_GUIDANCE, "model.size": "B/4"},
    "imagenet256-b4-ablation": {
        **_IMAGENET,
        **_NO_GUIDANCE,
        "model.size": "B/4",
        "steps": 400_320,
    },  # 80 epochs x 5,004
    "imagenet256-b2": {**_IMAGENET, **_B2_GUIDANCE, "model.size": "B/2"},
    "imagenet256-m2": {**_IMAGENET, **_B2_GUIDANCE, "model.size": "M/2"},
    "imagenet256-l2": {**_IMAGENET, **_B2_GUIDANCE, "model.size": "L/2"},
    "imagenet256-xl2": {
        **_IMAGENET,
        "model.size": "XL/2",
        "guidance.omega": 0.2,
        "guidance.kappa": 0.92,
        "guidance.t_max": 0.75,
    },
    "imagenet256-imf-b2": _IMF_B2,
}

PRESET_HELP = {
    "mlp": "the library defaults (the paper's ImageNet times, p = 1, constant lr) on the MLP",
    "vectors": "vector data of any dimension but 2 (default when D != 2): toy-2d's recipe at "
    "5,000 steps",
    "toy-2d": "2-D data, about 3 minutes on 2 CPU cores (default when D = 2); chosen with "
    "benchmarks/toy_quality.py, see docs/benchmarks.md",
    "tiny": "a few-second smoke run (tests)",
    "fashion-mnist-small": "Fashion-MNIST on 2 CPU cores (default for --data fashion-mnist); "
    "0.34M-parameter U-Net, class-conditional with guidance w' = 2, r != t share 0% -> 50%",
    "digits-small": "scikit-learn digits at 16x16 on 2 CPU cores (default for --data digits); "
    "guidance w' = 1 (omega 0.5, kappa 0.5)",
    "unet-small": "any other images: the small U-Net sized to the data (default for images)",
    "cifar10-paper": "the authors' CIFAR-10 recipe (unconditional DDPM++ U-Net, 55.9M "
    "parameters, batch 1024, lr 6e-4, p 0.75, 75% r != t, "
    "logit-normal(-2, 2)); GPU",
    "cifar10-paper-improved": "as cifar10-paper with the authors' improved times "
    "t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6) and their v1 sampler "
    "(time.order=official-v1); GPU",
    "imagenet256-b4": "DiT-B/4 on 32x32x4 latents, the authors' config (run_b4.yml): 240 "
    "epochs, guidance omega 1.0, kappa 0.5 (their default.py); their README: FID 11.35",
    "imagenet256-b4-ablation": "DiT-B/4 for 80 epochs without guidance, the paper's Table 1 "
    "(a-e) default: FID 61.06",
    "imagenet256-b2": "DiT-B/2 (131M) on latents, paper recipe, 240 epochs, omega 1.0, kappa 0.5; "
    "paper Table 2: FID 6.17",
    "imagenet256-m2": "DiT-M/2 (308M) on latents, paper recipe, 240 epochs; guidance as B/2 "
    "(none published for M/2); paper Table 2: FID 5.01",
    "imagenet256-l2": "DiT-L/2 (459M) on latents, paper recipe, 240 epochs; guidance as B/2 "
    "(none published for L/2); paper Table 2: FID 3.84",
    "imagenet256-xl2": "DiT-XL/2 (676M) on latents, paper recipe, 240 epochs, omega 0.2, kappa "
    "0.92, guidance for t in [0, 0.75]; paper Table 2: FID 3.43 (1 step), 2.93 (2 steps)",
    "imagenet256-imf-b2": "improved MeanFlow B/2 as its authors train it (Lyy-iiis/imeanflow): "
    "auxiliary velocity head on the last 8 blocks, guidance scale as input, 50% r = t, 640 "
    "epochs of batch 1024; sample with guidance 7.5 on [0.4, 0.65]; their README: FID 3.39",
}


@dataclass(frozen=True)
class Published:
    """The published figure a paper preset should reproduce: FID-50K of 1-step (and, where
    published, 2-step) samples after ``epochs`` epochs, with where it is printed."""

    source: str
    fid_1step: float
    fid_2step: float | None
    epochs: int


# Paper: Table 1 (B/4 ablations, 80 epochs), Table 2 (ImageNet 256, 1 and 2 NFE), Table 3
# (CIFAR-10). README: the authors' JAX repository (MF-B/4 "Performance": paper / their repo).
PUBLISHED: dict[str, Published] = {
    "imagenet256-b4-ablation": Published(
        "paper Table 1 (a-e) default, no guidance (README guidance_eq none: 61.09 paper, 60.75 "
        "their repo)",
        61.06,
        None,
        80,
    ),
    "imagenet256-b4": Published(
        "authors' README, guidance_eq cfg, omega 1.0, kappa 0.5 (19.15 at 80 epochs; released "
        "MF-B/4 checkpoint: 11.4)",
        11.35,
        None,
        240,
    ),
    "imagenet256-b2": Published("paper Table 2", 6.17, None, 240),
    "imagenet256-m2": Published("paper Table 2", 5.01, None, 240),
    "imagenet256-l2": Published("paper Table 2", 3.84, None, 240),
    "imagenet256-xl2": Published("paper Table 2", 3.43, 2.93, 240),
    "cifar10-paper": Published("paper Table 3 (unconditional)", 2.92, None, 16_000),
}


def default_preset(kind: str, shape: tuple[int, ...], data: str = "") -> str:
    """The preset chosen when none is given, from the data's kind and shape."""
    if kind == "vectors":
        return "toy-2d" if shape == (2,) else "vectors"
    if data == "fashion-mnist":
        return "fashion-mnist-small"
    if data == "digits":
        return "digits-small"
    return "unet-small"


def apply_preset(cfg: TrainConfig, name: str) -> None:
    if name not in PRESETS:
        raise MeanFlowError(
            f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    for key, value in PRESETS[name].items():
        set_value(cfg, key, value)
    cfg.preset = name


def configure(
    base: TrainConfig, preset: str | None = None, settings: Sequence[tuple[str, Any]] = ()
) -> TrainConfig:
    """A copy of ``base`` with ``preset`` applied (if given), then each dotted ``(key, value)``
    of ``settings`` in order: the precedence of the command line."""
    cfg = TrainConfig.from_dict(base.to_dict())
    if preset is not None:
        apply_preset(cfg, preset)
    for key, value in settings:
        set_value(cfg, key, value)
    return cfg
