"""Reading a run directory back: normalization, the trained network, samples in data units."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import MeanFlowError, check
from ..plotting import scatter_png
from ..sampling import sample
from .checkpoint import latest_checkpoint, load_checkpoint, prefixed
from .config import TrainConfig
from .factory import build_model

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples-1step.png")


@dataclass
class Normalizer:
    """Per-dimension standardization ``(x - mean) / std``; samples are mapped back."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, data: np.ndarray) -> "Normalizer":
        x = torch.from_numpy(data).double()
        std = x.std(dim=0).clamp_min(1e-8) if x.shape[0] > 1 else torch.ones(x.shape[1])
        return cls(x.mean(dim=0).float(), std.float())

    @classmethod
    def identity(cls, dim: int) -> "Normalizer":
        return cls(torch.zeros(dim), torch.ones(dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data.mean": self.mean, "data.std": self.std}


@dataclass
class TrainedRun:
    model: nn.Module
    config: TrainConfig
    normalizer: Normalizer
    step: int
    weights: str  # "ema" or "raw"

    def sample(self, num: int, steps: int = 1, seed: int = 0, schedule=None,
               device: torch.device | str = "cpu", batch: int = 65536) -> np.ndarray:
        """``num`` samples in data units as an (num, D) float32 array."""
        check(num >= 1, f"--num must be >= 1, got {num}")
        g = torch.Generator().manual_seed(seed)
        dim = self.normalizer.mean.numel()
        chunks = []
        for i in range(0, num, batch):
            noise = torch.randn(min(batch, num - i), dim, generator=g).to(device)
            z = sample(self.model, noise, steps=steps, schedule=schedule)
            chunks.append(self.normalizer.decode(z).cpu())
        return torch.cat(chunks).numpy().astype(np.float32)


def load_run(run_dir: str, weights: str = "ema", device: torch.device | str = "cpu") -> TrainedRun:
    """Load the newest checkpoint of ``run_dir`` with EMA (default) or raw weights."""
    check(os.path.isdir(run_dir), f"run directory {run_dir!r} does not exist")
    check(weights in ("ema", "raw"), f"weights must be 'ema' or 'raw', got {weights!r}")
    tensors, meta = load_checkpoint(latest_checkpoint(run_dir))
    cfg = TrainConfig.from_dict(meta["config"])
    model = build_model(cfg, int(meta["dim"]))
    try:
        model.load_state_dict(prefixed(tensors, "model" if weights == "raw" else "ema"))
    except RuntimeError as exc:
        raise MeanFlowError(f"checkpoint of {run_dir!r} does not match its configured network "
                            f"({str(exc).splitlines()[0]})") from None
    normalizer = Normalizer(tensors["data.mean"], tensors["data.std"])
    return TrainedRun(model.to(device).eval(), cfg, normalizer, int(meta["step"]), weights)


def write_sample_plot(run_dir: str, model: nn.Module, normalizer: Normalizer, cfg: TrainConfig,
                      device, data: np.ndarray) -> str:
    """Write ``samples-1step.png``: one-step samples from ``model`` beside ``data``."""
    run = TrainedRun(model, cfg, normalizer, 0, "ema")
    samples = run.sample(cfg.sample_num, steps=1, seed=cfg.seed, device=device)
    path = os.path.join(run_dir, "samples-1step.png")
    scatter_png(path, [("training data", data), (f"{cfg.objective}, 1 step (EMA)", samples)])
    return path
