"""Builds networks, objectives and optimizers from a :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..data.augment import AugmentPipe, augment_config
from ..errors import MeanFlowError, check
from ..nn import MLP, SONGUNET_CONFIGS, UNET_CONFIGS, dit, songunet, unet
from ..objectives.guidance import Guidance
from ..objectives.imf import GuidanceInputs
from ..objectives.meanflow import MeanFlow
from ..objectives.registry import objective_entry
from .schema import TrainConfig


def _overrides(
    cfg: TrainConfig, configs: dict, default: str, what: str, channels: str, blocks: str
) -> tuple[str, dict]:
    """``(size name, overrides)`` of a U-Net-like network from ``model.size``,
    ``model.channels``, ``model.blocks`` and ``model.dropout`` (0 / -1: the config's)."""
    m = cfg.model
    name = m.size or default
    check(name in configs, f"unknown {what} model.size {name!r}; use one of {', '.join(configs)}")
    pairs = ((channels, m.channels), (blocks, m.blocks), ("dropout", m.dropout))
    return name, {key: value for key, value in pairs if (value >= 0 if key == "dropout" else value)}


def _unet(cfg: TrainConfig, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    name, overrides = _overrides(
        cfg, UNET_CONFIGS, "small", "U-Net", "base_channels", "num_res_blocks"
    )
    channels, size = shape[0], shape[1]
    # fewer levels for sizes that the config's levels do not divide (e.g. 30 = 2 x 15)
    mult = tuple(UNET_CONFIGS[name]["channel_mult"])
    while len(mult) > 1 and size % 2 ** (len(mult) - 1):
        mult = mult[:-1]
    overrides["channel_mult"] = mult
    factors = [
        d
        for d in UNET_CONFIGS[name].get("attention_downsample", ())
        if size % d == 0 and d <= 2 ** (len(mult) - 1)
    ]
    overrides["attention_resolutions"] = tuple(size // d for d in factors)
    return unet(
        name,
        in_channels=channels,
        input_size=size,
        num_classes=num_classes,
        guidance_inputs=cfg.guidance.inputs,
        aux_head=cfg.model.aux_head,
        **overrides,
    )


def _songunet(cfg: TrainConfig, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The authors' CIFAR-10 DDPM++ U-Net (``model.size`` cifar10-paper by default); the
    channels, blocks and dropout overrides apply as for the U-Net."""
    name, overrides = _overrides(
        cfg, SONGUNET_CONFIGS, "cifar10-paper", "SongUNet", "model_channels", "num_blocks"
    )
    if cfg.augment:  # one label input per transformation the pipeline can apply
        active = tuple(AugmentPipe(**augment_config(cfg.augment)).active_labels)
        overrides.update(augment_dim=len(active), augment_columns=active)
    return songunet(
        name, in_channels=shape[0], input_size=shape[1], num_classes=num_classes, **overrides
    )


def build_model(cfg: TrainConfig, shape: tuple[int, ...], num_classes: int = 0) -> nn.Module:
    """The network for samples of ``shape`` ((D,) or (C, H, W)) and ``num_classes`` labels."""
    m = cfg.model
    inputs = cfg.guidance.inputs
    check(
        not inputs or num_classes > 0,
        "guidance.inputs=true needs labelled data (the "
        "guidance scale conditions a class-conditional network)",
    )
    check(
        not inputs or m.arch in ("mlp", "unet", "dit"),
        f"guidance.inputs=true is built for the mlp, unet and dit networks, not {m.arch}",
    )
    if m.arch == "mlp":
        check(
            len(shape) == 1,
            f"model.arch mlp needs vector data (N, D), got samples of shape "
            f"{shape}; use --set model.arch=unet (or a preset such as unet-small)",
        )
        return MLP(
            shape[0],
            hidden=m.hidden,
            depth=m.depth,
            time_input=m.time_input,
            time_dim=m.time_dim,
            num_classes=num_classes,
            guidance_inputs=inputs,
            aux_head=m.aux_head,
            z_features=m.z_features,
        )
    check(
        len(shape) == 3 and shape[1] == shape[2],
        f"model.arch {m.arch} needs square images "
        f"(C, H, W), got samples of shape {shape}; vectors use model.arch=mlp",
    )
    check(
        m.time_input == "t,t-r",
        f"model.time_input={m.time_input} is an MLP option; the "
        f"{m.arch} embeds (t, t - r) as the paper does",
    )
    if m.arch == "unet":
        return _unet(cfg, shape, num_classes)
    if m.arch == "songunet":
        return _songunet(cfg, shape, num_classes)
    if m.arch == "dit":
        return dit(
            m.size or "B/2",
            input_size=shape[1],
            in_channels=shape[0],
            num_classes=num_classes,
            guidance_inputs=inputs,
            aux_head=m.aux_head,
            aux_depth=m.aux_depth,
        )
    raise MeanFlowError(f"unknown model.arch {m.arch!r}; available: mlp, unet, songunet, dit")


def build_objective(cfg: TrainConfig, num_classes: int = 0) -> MeanFlow:
    """The objective named by ``cfg.objective`` (:data:`meanflow.objectives.registry.OBJECTIVES`);
    with classes, guidance composed into it (``guidance.inputs``: the scale as network input)."""
    entry = objective_entry(cfg.objective)
    g = cfg.guidance
    guidance: Guidance | None = None
    if num_classes > 0 and g.inputs:
        guidance = GuidanceInputs(
            num_classes, omega_max=g.omega_max, label_dropout=g.label_dropout, drop_rows=g.drop_rows
        )
    elif num_classes > 0:
        guidance = Guidance(
            num_classes,
            omega=g.omega,
            kappa=g.kappa,
            t_min=g.t_min,
            t_max=g.t_max,
            label_dropout=g.label_dropout,
            drop_rows=g.drop_rows,
        )
    own = dataclasses.asdict(getattr(cfg, entry.section)) if entry.section else {}
    return entry.build(
        cfg.time,
        guidance,
        p=cfg.loss.p,
        c=cfg.loss.c,
        jvp=cfg.loss.jvp,
        jvp_dtype=cfg.loss.jvp_dtype,
        self_velocity=cfg.loss.self_velocity,
        **_jvp_options(cfg),
        **own,
        **({"aux_head": True} if cfg.model.aux_head else {}),
    )


def _jvp_options(cfg: TrainConfig) -> dict:
    """The JVP back-end options of ``cfg.loss`` (``fd_step`` 0: the scheme's default)."""
    return dict(
        jvp_backend=cfg.loss.jvp_backend,
        fd_step=cfg.loss.fd_step or None,
        fd_scheme=cfg.loss.fd_scheme,
        time_tangent=cfg.loss.time_tangent,
    )


def build_augment(cfg: TrainConfig, model: nn.Module, kind: str):
    """EDM's augmentation pipeline named by ``cfg.augment`` (None when empty), after checking
    that the data are images and that the network takes its labels (``aug=``)."""
    if not cfg.augment:
        return None
    import inspect

    check(kind == "images", f"augment={cfg.augment} needs image data, not {kind}")
    check(
        "aug" in inspect.signature(model.forward).parameters
        and getattr(model, "augment_dim", 0) > 0,
        f"augment={cfg.augment} feeds "
        "its labels to the network, which must take aug= (the SongUNet: "
        "model.arch=songunet); or drop --set augment",
    )
    return AugmentPipe(**{**augment_config(cfg.augment), "p": cfg.augment_p})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
