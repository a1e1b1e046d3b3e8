"""What the loop does around its steps, as hooks: ``after_step(state, stats)`` after every
finished step, ``close()`` once at the end (also after an error).

- :class:`MetricsLog`: every ``log_every`` steps one ``metrics.jsonl`` record (means over the
  window of loss, unweighted error and gradient norm; steps per second, learning rate, skipped
  steps, memory, threads, and for vector data the one-step sample quality), the progress bar
  and TensorBoard's scalars;
- :class:`PreviewGrids`: image runs write ``samples/step-N.png`` (one-step EMA samples from the
  run's fixed noise) and ``loss.png`` every ``grid_every`` steps, and the grid to TensorBoard.

The checkpoint manager (state.py) is a hook too. Hooks run on every rank in the order given;
those that write are built on rank 0 only. None of them draws from the run's generators, so
they cannot change the training itself.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..data import TrainingSet
from ..errors import MeanFlowError
from ..eval.distances import sliced_wasserstein
from ..runs.run import TrainedRun
from .pictures import write_loss_curve, write_preview
from .reliability import memory_mib
from .state import TrainState
from .step import StepStats


class Hook(Protocol):
    def after_step(self, state: TrainState, stats: StepStats) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """``metrics.jsonl``, the progress bar and TensorBoard's scalars (module docstring).
    ``probe``: a function giving the one-step sample quality, with its noise floor ``floor``
    (see :func:`quality_probe`), or None."""

    def __init__(
        self,
        run_dir: str,
        every: int,
        steps: int,
        bar: tqdm,
        writer: Any = None,
        probe=None,
        floor: float | None = None,
        world_size: int = 1,
    ) -> None:
        self.every, self.steps, self.bar, self.writer = every, steps, bar, writer
        self.probe, self.floor, self.world_size = probe, floor, world_size
        self.log = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.start = self.window_start = time.perf_counter()
        self.window: list[tuple[float, float, float]] = []

    def after_step(self, state: TrainState, stats: StepStats) -> None:
        self.window.append((stats.loss, stats.mse, stats.grad_norm))
        self.bar.update(1)
        if state.step % self.every and state.step != self.steps:
            return
        now, window = time.perf_counter(), self.window
        mean = [sum(w[i] for w in window) / len(window) for i in range(3)]
        record = {
            "step": state.step,
            "loss": mean[0],
            "mse": mean[1],
            "grad_norm": mean[2],
            "steps_per_s": len(window) / max(now - self.window_start, 1e-9),
            "lr": state.optimizer.param_groups[0]["lr"],
            "skipped": state.skipped,
            "elapsed_s": now - self.start,
            "memory_mib": memory_mib(),
            "threads": torch.get_num_threads(),
        }
        if self.world_size > 1:
            record["world_size"] = self.world_size
        if self.probe is not None:
            record.update(swd_1step=self.probe(), swd_floor=self.floor)
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        self.bar.set_postfix(loss=f"{mean[0]:.4f}", mse=f"{mean[1]:.4f}")
        if self.writer is not None:
            for key in ("loss", "mse", "grad_norm", "lr", "steps_per_s", "swd_1step"):
                if key in record:
                    self.writer.add_scalar(f"train/{key}", record[key], state.step)
        self.window, self.window_start = [], now

    def close(self) -> None:
        self.bar.close()
        self.log.close()
        if self.writer is not None:
            self.writer.close()


class PreviewGrids:
    """``samples/step-N.png`` and ``loss.png`` every ``every`` steps of an image run."""

    def __init__(self, run_dir: str, run: TrainedRun, device, every: int, writer=None) -> None:
        self.run_dir, self.run, self.device, self.every = run_dir, run, device, every
        self.writer = writer

    def after_step(self, state: TrainState, stats: StepStats) -> None:
        if not (self.run.is_image and self.every and state.step % self.every == 0):
            return
        cfg = self.run.config
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        path = os.path.join(self.run_dir, "samples", f"step-{state.step:08d}.png")
        write_preview(path, self.run, self.device, seed=cfg.seed)
        write_loss_curve(self.run_dir, f"{cfg.objective} on {cfg.data}")
        if self.writer is not None:
            import numpy as np
            from PIL import Image  # optional: only TensorBoard's image needs it

            with Image.open(path) as image:
                self.writer.add_image(
                    "samples/one_step",
                    np.asarray(image.convert("RGB")),
                    state.step,
                    dataformats="HWC",
                )

    def close(self) -> None:
        """Nothing to release."""


def quality_probe(run: TrainedRun, data: TrainingSet, device, seed: int):
    """For vector data, ``(probe, floor)``: ``probe()`` is the sliced Wasserstein distance
    (128 projections, data units) between ``n`` one-step EMA samples from fixed noise and ``n``
    fixed training points, ``n = min(2000, N // 2)``; ``floor`` is the same distance between
    those points and ``n`` other training points (sampling noise alone). It shows progress where
    the MeanFlow loss cannot (docs/method.md). Own generators: the run's randomness is
    untouched. ``(None, None)`` for images or fewer than 200 points."""
    if data.kind != "vectors" or len(data) < 200:
        return None, None
    assert data.x is not None  # vector sets are held in memory
    n = min(2000, len(data) // 2)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    reference, other = data.x[pick[:n]], data.x[pick[n : 2 * n]]
    floor = sliced_wasserstein(other, reference, projections=128)

    def probe() -> float:
        samples = run.sample(n, steps=1, seed=seed + 1, device=device)
        return sliced_wasserstein(samples, reference, projections=128)

    return probe, floor


def tensorboard_class():
    """TensorBoard's SummaryWriter class, or one clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
    except ImportError:
        raise MeanFlowError(
            "tensorboard=true needs the tensorboard package; run "
            "`pip install 'meanflow[tensorboard]'` or drop --tensorboard"
        ) from None
    return SummaryWriter
