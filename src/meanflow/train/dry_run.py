"""What ``meanflow train --dry-run`` prints: the network, objective and optimizer a
configuration builds, on the meta device (shapes only, no memory), with the guidance and the
published figure the preset should reproduce."""

from __future__ import annotations

import torch

from ..config.build import build_model, build_objective, count_parameters
from ..config.presets import PUBLISHED
from ..config.schema import TrainConfig
from ..data import TrainingSet
from ..errors import check
from .optimizer import build_optimizer


def describe(cfg: TrainConfig, data: TrainingSet | None) -> dict:
    """What ``--dry-run`` prints: the network, objective and optimizer ``cfg`` builds (on the
    meta device: shapes only, no memory)."""
    check(
        bool(cfg.shape),
        f"preset {cfg.preset!r} does not say the data shape; pass --data "
        "or --set data_shape=CxHxW (or D)",
    )
    classes = cfg.num_classes if cfg.conditional else 0
    with torch.device("meta"):
        model = build_model(cfg, cfg.shape, classes)
    objective = build_objective(cfg, classes)
    build_optimizer(cfg, model)
    g = cfg.guidance
    guidance = {
        "omega": g.omega,
        "kappa": g.kappa,
        "interval": [g.t_min, g.t_max],
        "effective_scale": g.omega / (1 - g.kappa) if g.kappa < 1 else None,
        "label_dropout": g.label_dropout,
    }
    published = PUBLISHED.get(cfg.preset)
    return {
        "preset": cfg.preset,
        "parameters": count_parameters(model),
        "model": type(model).__name__,
        "arch": cfg.model.arch,
        "size": cfg.model.size,
        "data_shape": list(cfg.shape),
        "num_classes": classes,
        "objective": type(objective).__name__,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "data": cfg.data if data is not None else None,
        "data_samples": len(data) if data is not None else None,
        "guidance": guidance if classes else None,
        "hflip": cfg.hflip,
        "precision": cfg.precision,
        "reproduces": vars(published) if published else None,
    }
