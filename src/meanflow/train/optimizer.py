"""The optimizer of a run: Adam or AdamW (``optim.*`` keys)."""

from __future__ import annotations

import torch
from torch import nn

from ..config.schema import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW on fp32 weights; the fused kernel on CUDA unless ``optim.fused=off``."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    on_cuda = any(p.is_cuda for p in model.parameters())
    fused = {"on": True, "off": False, "auto": on_cuda}[o.fused] or None
    return cls(
        model.parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        weight_decay=o.weight_decay,
        fused=fused,
    )
