"""Builds networks, objectives and optimizers from a :class:`TrainConfig`."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MeanFlowError
from ..nn import MLP
from ..objective import FlowMatching, MeanFlow
from .config import TrainConfig


def build_model(cfg: TrainConfig, dim: int) -> nn.Module:
    m = cfg.model
    if m.arch == "mlp":
        return MLP(dim, hidden=m.hidden, depth=m.depth, time_input=m.time_input,
                   time_dim=m.time_dim)
    raise MeanFlowError(f"unknown model.arch {m.arch!r}; available: mlp")


def build_objective(cfg: TrainConfig) -> MeanFlow:
    if cfg.objective == "flow-matching":
        return FlowMatching(cfg.time, p=cfg.loss.p, c=cfg.loss.c)
    return MeanFlow(cfg.time, p=cfg.loss.p, c=cfg.loss.c, jvp=cfg.loss.jvp)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MeanFlowError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MeanFlowError("--device cuda was asked for but no CUDA GPU is available; use cpu")
    return device
