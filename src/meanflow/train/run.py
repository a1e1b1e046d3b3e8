"""Reading a run directory back: normalization, the trained network, samples in data units,
and the pictures a run writes (scatter plot or image grid, loss curve)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import MeanFlowError, check
from ..guidance import sampling_guidance
from ..plotting import image_grid_png, loss_curve_png, scatter_png
from ..sampling import sample
from .checkpoint import load_latest_good, prefixed
from .config import TrainConfig
from .factory import build_model

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples-1step.png", "samples",
             "loss.png", "tensorboard")


@dataclass
class Normalizer:
    """Standardization ``(x - mean) / std`` per dimension of vectors (mean of shape (D,)) or per
    channel of (C, H, W) arrays (shape (C, 1, 1)); identity for images already in [-1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Normalizer":
        x = x.double()
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        keep = x.dim() != 2
        if x.shape[0] * (1 if x.dim() == 2 else x.shape[2] * x.shape[3]) < 2:
            return cls.identity(tuple(x.shape[1:]))
        std = x.std(dim=dims, keepdim=keep).clamp_min(1e-8)
        mean = x.mean(dim=dims, keepdim=keep)
        if keep:
            mean, std = mean[0], std[0]
        return cls(mean.float(), std.float())

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> "Normalizer":
        stat = (shape[0],) if len(shape) == 1 else (shape[0], 1, 1)
        return cls(torch.zeros(stat), torch.ones(stat))

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
    shape: tuple[int, ...] = ()
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def trained_scale(self) -> float:
        """The CFG scale folded into training, ``omega / (1 - kappa)`` (1 when unconditional)."""
        g = self.config.guidance
        return g.omega / (1 - g.kappa) if self.num_classes else 1.0

    def sample(self, num: int, steps: int = 1, seed: int = 0, schedule=None,
               device: torch.device | str = "cpu", batch: int | None = None,
               labels: torch.Tensor | None = None, guidance: float = 1.0) -> np.ndarray:
        """``num`` samples in data units, float32 of shape (num, *shape). ``labels`` (num,)
        condition a class-conditional run (None: the null label, i.e. unconditional);
        ``guidance`` != 1 adds classifier-free guidance at sampling time
        (:func:`~meanflow.guidance.sampling_guidance`, two evaluations per step)."""
        chunks = list(self.iter_samples(num, steps, seed, schedule, device, batch, labels,
                                        guidance))
        return torch.cat(chunks).numpy().astype(np.float32)

    def iter_samples(self, num: int, steps: int = 1, seed: int = 0, schedule=None,
                     device: torch.device | str = "cpu", batch: int | None = None,
                     labels: torch.Tensor | None = None, guidance: float = 1.0):
        """The samples of :meth:`sample` (the same ones for the same arguments), as float32 CPU
        tensors of at most ``batch`` rows, so callers can stream them with bounded memory."""
        check(num >= 1, f"--num must be >= 1, got {num}")
        if labels is not None:
            check(self.num_classes > 0, "this run is unconditional; drop --class")
            check(tuple(labels.shape) == (num,), f"need {num} labels, got {tuple(labels.shape)}")
        model = self.model
        if guidance != 1:
            check(self.num_classes > 0, "--guidance needs a class-conditional run; this run is "
                  "unconditional")
            check(labels is not None, "--guidance needs class labels; not with --class none")
            model = sampling_guidance(self.model, guidance, self.num_classes)
        batch = batch or (65536 if len(self.shape) == 1 else 256)
        g = torch.Generator().manual_seed(seed)
        for i in range(0, num, batch):
            n = min(batch, num - i)
            noise = torch.randn(n, *self.shape, generator=g).to(device)
            y = None if labels is None else labels[i:i + n].to(device)
            z = sample(model, noise, steps=steps, schedule=schedule, y=y)
            yield self.normalizer.decode(z).float().cpu()


def load_run(run_dir: str, weights: str = "ema", device: torch.device | str = "cpu") -> TrainedRun:
    """Load the newest checkpoint of ``run_dir`` with EMA (default) or raw weights."""
    check(os.path.isdir(run_dir), f"run directory {run_dir!r} does not exist")
    check(weights in ("ema", "raw"), f"weights must be 'ema' or 'raw', got {weights!r}")
    _, tensors, meta = load_latest_good(run_dir)
    cfg = TrainConfig.from_dict(meta["config"])
    shape = tuple(meta["shape"]) if "shape" in meta else (int(meta["dim"]),)
    model = build_model(cfg, shape, cfg.num_classes)
    try:
        model.load_state_dict(prefixed(tensors, "model" if weights == "raw" else "ema"))
    except RuntimeError as exc:
        raise MeanFlowError(f"checkpoint of {run_dir!r} does not match its configured network "
                            f"({str(exc).splitlines()[0]})") from None
    normalizer = Normalizer(tensors["data.mean"], tensors["data.std"])
    return TrainedRun(model.to(device).eval(), cfg, normalizer, int(meta["step"]), weights,
                      shape, meta.get("class_names"))


def grid_labels(num: int, num_classes: int) -> torch.Tensor | None:
    """Labels ``i mod K``: in a grid of K columns, one column per class."""
    return None if num_classes == 0 else torch.arange(num) % num_classes


def parse_classes(text: str | None, num: int, run, seed: int):
    """Labels (num,) for ``--class`` (see its help), or None for the null label / unlabelled."""
    k = run.num_classes
    if k == 0:
        check(text is None, "--class needs a class-conditional run; this run is unconditional")
        return None
    if text is None:
        return grid_labels(num, k)
    if text.strip().lower() == "none":
        return None
    if text.strip().lower() == "random":
        return torch.randint(0, k, (num,), generator=torch.Generator().manual_seed(seed + 1))
    names = run.class_names or [str(i) for i in range(k)]
    labels = []
    for item in (v.strip() for v in text.split(",")):
        if item.isdigit() and int(item) < k:
            labels.append(int(item))
        elif item in names:
            labels.append(names.index(item))
        else:
            raise MeanFlowError(f"--class {item!r} is not a class of this run; use 0..{k - 1}"
                                f", one of {', '.join(names[:10])}{', ...' if k > 10 else ''}"
                                ", 'random' or 'none'")
    return torch.tensor(labels)[torch.arange(num) % len(labels)]


def grid_columns(num: int, num_classes: int) -> int:
    if 0 < num_classes <= 32:
        return num_classes
    return max(1, math.isqrt(num))


def write_preview(path: str, run: TrainedRun, device, reference: np.ndarray | None = None,
                  seed: int = 0, title: str = "") -> str:
    """One-step samples of ``run`` as a picture: an image grid (fixed noise from ``seed``, one
    column per class when conditional) or a scatter plot beside ``reference`` points."""
    cfg = run.config
    tmp = path + ".tmp.png"
    if run.is_image:
        labels = grid_labels(cfg.grid_num, cfg.num_classes)
        images = run.sample(cfg.grid_num, steps=1, seed=seed, device=device, labels=labels)
        scale = max(1, 64 // run.shape[1])
        image_grid_png(tmp, images, grid_columns(cfg.grid_num, cfg.num_classes), scale=scale)
    else:
        points = run.sample(cfg.sample_num, steps=1, seed=seed, device=device)
        panels = [] if reference is None else [("training data", reference)]
        scatter_png(tmp, panels + [(title or f"{cfg.objective}, 1 step (EMA)", points)])
    os.replace(tmp, path)
    return path


def write_loss_curve(run_dir: str, title: str = "") -> str | None:
    """``loss.png`` from ``metrics.jsonl`` (nothing when there are no records yet)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        return None
    out = os.path.join(run_dir, "loss.png")
    loss_curve_png(out + ".tmp.png", records, title)
    os.replace(out + ".tmp.png", out)
    return out
