"""Which device a command runs on: ``auto`` is the CUDA GPU when one is available, else the CPU."""

from __future__ import annotations

import torch

from ..errors import MeanFlowError


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
