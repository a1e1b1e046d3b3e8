"""The pictures a run writes: the one-step preview (an image grid with one column per class, or
a scatter plot beside the data) and ``loss.png`` from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from ..plotting import image_grid_png, loss_curve_png, scatter_png
from ..runs.run import grid_columns, grid_labels

if TYPE_CHECKING:
    from ..runs.run import TrainedRun


def write_preview(
    path: str,
    run: TrainedRun,
    device,
    reference: np.ndarray | None = None,
    seed: int = 0,
    title: str = "",
) -> str:
    """One-step samples of ``run`` as a picture: an image grid (fixed noise from ``seed``, one
    column per class, headed by its name, when conditional) or a scatter plot beside
    ``reference`` points."""
    cfg = run.config
    tmp = path + ".tmp.png"
    if run.is_image:
        labels = grid_labels(cfg.grid_num, cfg.num_classes)
        images = run.sample(cfg.grid_num, steps=1, seed=seed, device=device, labels=labels)
        if images.shape[1] not in (1, 3):  # latents without their VAE: three channels shown
            images = images[:, :3] / max(1e-8, float(np.abs(images).max()))
        scale = max(1, 64 // images.shape[-1])
        image_grid_png(
            tmp,
            images,
            grid_columns(cfg.grid_num, cfg.num_classes),
            scale=scale,
            class_names=run.class_names,
            labels=labels,
        )
    else:
        points = run.sample(cfg.sample_num, steps=1, seed=seed, device=device)
        panels = [] if reference is None else [("training data", reference)]
        scatter_png(tmp, panels + [(title or f"{cfg.objective}, 1 step (EMA)", points)])
    os.replace(tmp, path)
    return path


def write_loss_curve(run_dir: str, title: str = "") -> str | None:
    """``loss.png`` from ``metrics.jsonl`` (see :func:`~meanflow.plotting.loss_curve_png`: the
    unweighted squared error, smoothed, and the weighted loss; a run of fewer than 3 records gets
    a figure saying it is too short for a curve). Nothing when there are no records yet."""
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
