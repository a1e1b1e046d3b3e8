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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..data import TrainingSet
from ..errors import MeanFlowError
from ..eval.distances import sliced_wasserstein
from ..eval.features import extract, load_feature_net, shipped_feature_nets
from ..eval.frechet import fd_from_features
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
    ``probe``: the one-step sample quality probe of :func:`quality_probe`, or None."""

    def __init__(
        self,
        run_dir: str,
        every: int,
        steps: int,
        bar: tqdm,
        writer: Any = None,
        probe: Probe | None = None,
        world_size: int = 1,
    ) -> None:
        self.every, self.steps, self.bar, self.writer = every, steps, bar, writer
        self.probe, self.world_size = probe, world_size
        self.probed = -1  # the last probe's step // probe.every
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
        probe = self.probe
        if probe is not None and self._probe_due(state.step):
            record.update(
                {f"{probe.name}_1step": probe.measure(), f"{probe.name}_floor": probe.floor}
            )
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        self.bar.set_postfix(loss=f"{mean[0]:.4f}", mse=f"{mean[1]:.4f}")
        if self.writer is not None:
            for key in ("loss", "mse", "grad_norm", "lr", "steps_per_s", "swd_1step", "fd_1step"):
                if key in record:
                    self.writer.add_scalar(f"train/{key}", record[key], state.step)
        self.window, self.window_start = [], now

    def _probe_due(self, step: int) -> bool:
        """The first record at or after each multiple of the probe's ``every`` (and the last)."""
        assert self.probe is not None
        every = self.probe.every or self.every
        if step // every > self.probed or step == self.steps:
            self.probed = step // every
            return True
        return False

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


@dataclass
class Probe:
    """A one-step sample quality measure: ``measure()`` logged as ``<name>_1step`` beside its
    noise floor ``<name>_floor``, at the first log record after every ``every`` steps (0: every
    record)."""

    name: str  # "swd" (vectors) or "fd" (images)
    measure: Callable[[], float]
    floor: float
    every: int = 0


def quality_probe(run: TrainedRun, data: TrainingSet, device, seed: int, every: int = 0):
    """The run's :class:`Probe`, or None. It shows progress where the MeanFlow loss cannot
    (docs/method.md). Own generators: the run's randomness is untouched, so resuming stays
    bitwise.

    - Vectors (>= 200 points): the sliced Wasserstein distance (128 projections, data units)
      between ``n`` one-step EMA samples from fixed noise and ``n`` fixed training points,
      ``n = min(2000, N // 2)``; its floor is the same distance between those points and ``n``
      other training points (sampling noise alone). Every log record.
    - Images of a data set with a shipped feature network (fashion-mnist, digits at 16x16): the
      Frechet distance in that network's features between ``n = min(500, N // 2)`` one-step EMA
      samples from fixed noise, with the labels of ``n`` fixed training images, and those
      images; its floor is the FD between them and ``n`` other training images. Every
      ``every`` steps (``grid_every``), as it costs ``n`` samples."""
    if data.kind == "vectors" and len(data) >= 200:
        assert data.x is not None  # vector sets are held in memory
        n = min(2000, len(data) // 2)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        reference, other = data.x[pick[:n]], data.x[pick[n : 2 * n]]

        def swd() -> float:
            samples = run.sample(n, steps=1, seed=seed + 1, device=device)
            return sliced_wasserstein(samples, reference, projections=128)

        return Probe("swd", swd, sliced_wasserstein(other, reference, projections=128))
    net = _feature_net(data, run.config.data)
    if net is None or len(data) < 100:
        return None
    assert data.x is not None  # image sets with a shipped network are held in memory
    n = min(500, len(data) // 2)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    real = extract(net, data.x[pick[:n]])
    labels = None if data.labels is None else data.labels[pick[:n]]
    labels = labels if run.num_classes else None

    def fd() -> float:
        samples = run.sample(n, steps=1, seed=seed + 1, device=device, labels=labels)
        return fd_from_features(extract(net, torch.from_numpy(samples)), real)

    return Probe("fd", fd, fd_from_features(extract(net, data.x[pick[n : 2 * n]]), real), every)


def _feature_net(data: TrainingSet, name: str):
    """The shipped feature network trained on data set ``name`` at this image shape, or None."""
    if data.kind != "images" or data.x is None:
        return None
    for shipped in shipped_feature_nets():
        with torch.random.fork_rng(devices=[]):  # building the network draws its initial weights
            net, meta = load_feature_net(shipped)
        if meta.get("data") == name and tuple(meta.get("image_shape", ())) == data.shape:
            return net
    return None


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
