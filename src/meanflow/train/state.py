"""One training state, saved and restored whole by one checkpoint manager.

:class:`TrainState` is everything the next step depends on: the network, its EMAs, the
optimizer, the data position, every random state and the counters. Its
:meth:`~TrainState.state_dict` is the checkpoint format of runs/checkpoint.py, flat tensors
(safetensors) and JSON metadata, never a pickle:

- tensors: ``model.*``, ``ema.*`` / ``ema-<decay>.*``, ``optim.<index>.<name>``,
  ``rng.generator`` (the run's generator: noise, ``(r, t)``, label dropout, flips),
  ``rng.torch`` (rank 0's global CPU generator: dropout), ``rng.torch.rank<k>`` (rank k's),
  ``rng.cuda.<i>``;
- metadata: ``step``, ``skipped_steps``, ``optimizer`` (hyper-parameters), ``batches``
  (epoch, index), ``ema_updates``, ``emas``, ``rng`` (Python's and NumPy's states).

The learning rate is a function of the step (``OptimConfig.lr_at``), so there is no scheduler
state to save. :meth:`~TrainState.load_state_dict` undoes :meth:`~TrainState.state_dict`
exactly, which is what makes a resumed run bitwise identical to an uninterrupted one: there is
one list of what a checkpoint holds, here.

:class:`CheckpointManager` writes and reads a run's ``checkpoints/``: it refuses to save
non-finite weights, gathers every rank's dropout generator, adds the run's constant fields
(config, data shape, class names, normalization) and lets rank 0 write; on resume it loads the
newest verified checkpoint and sets the corrupt newer ones aside (``*.corrupt``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.stream import StreamedBatches
from ..errors import check
from ..runs.checkpoint import (
    find_latest_good,
    load_optimizer,
    optimizer_tensors,
    prefixed,
    save_checkpoint,
    set_aside,
)
from ..runtime import distributed
from .batches import Batches
from .ema import EMA
from .reliability import all_finite, host_rng_state, restore_host_rng

Tensors = dict[str, torch.Tensor]


@dataclass
class TrainState:
    """What a run carries from one step to the next (module docstring). ``rank``: this
    process's rank, which picks its own dropout generator on load."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    batches: Batches | StreamedBatches
    generator: torch.Generator
    step: int = 0
    skipped: int = 0
    rank: int = 0

    def state_dict(self, torch_states: list[torch.Tensor] | None = None) -> tuple[Tensors, dict]:
        """``(tensors, meta)``; ``torch_states``: every rank's global CPU generator state, by
        rank (default: this process's alone)."""
        torch_states = torch_states or [torch.get_rng_state()]
        rng_meta, rng_tensors = host_rng_state()
        optim_tensors, optim_meta = optimizer_tensors(self.optimizer)
        tensors = {
            **{f"model.{k}": v for k, v in self.model.state_dict().items()},
            **self.ema.tensors(),  # ema.* (primary), ema-<decay>.* (extras)
            **rng_tensors,
            "rng.generator": self.generator.get_state(),
            "rng.torch": torch_states[0],
            **{f"rng.torch.rank{k}": v for k, v in enumerate(torch_states) if k},
            **optim_tensors,
        }
        meta = {
            "step": self.step,
            "skipped_steps": self.skipped,
            "optimizer": optim_meta,
            "batches": self.batches.state(),
            **self.ema.state(),
            "rng": rng_meta,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict) -> None:
        """Restore what :meth:`state_dict` saved (checkpoints without Python's and NumPy's
        states, or without per-rank generators, load too)."""
        self.model.load_state_dict(prefixed(tensors, "model"))
        self.ema.load(tensors, meta)
        load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng.generator"].to(self.generator.get_state().device))
        own = f"rng.torch.rank{self.rank}" if self.rank else "rng.torch"
        torch.set_rng_state(tensors.get(own, tensors["rng.torch"]))
        restore_host_rng(meta.get("rng"), tensors)
        self.batches.load_state(meta["batches"])
        self.step, self.skipped = int(meta["step"]), int(meta["skipped_steps"])


class CheckpointManager:
    """The checkpoints of run directory ``run_dir``: every ``every`` steps and at ``steps``,
    keeping ``keep`` (runs/checkpoint.py). ``constants``: the run's fixed ``(tensors, meta)``
    written into every checkpoint (config, shape, class names, normalization, ...). Every rank
    calls :meth:`save` (it gathers the ranks' generators); rank 0 alone writes."""

    def __init__(
        self,
        run_dir: str,
        every: int,
        steps: int,
        keep: int,
        constants: tuple[Tensors, dict[str, Any]] = ({}, {}),
        main: bool = True,
    ) -> None:
        self.run_dir, self.every, self.steps, self.keep = run_dir, every, steps, keep
        self.constants, self.main = constants, main
        self.saved_at: int | None = None  # the step of the last checkpoint saved or loaded
        self._corrupt: list[str] = []

    @property
    def directory(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def after_step(self, state: TrainState, stats: object = None) -> None:
        """Save when the step is due (a multiple of ``every``, or the last)."""
        if state.step % self.every == 0 or state.step == self.steps:
            self.save(state)

    def close(self) -> None:
        """Nothing to release (each checkpoint is complete once saved)."""

    def save(self, state: TrainState) -> None:
        """Write ``state`` (once per step: nothing when this step is saved already)."""
        if self.saved_at == state.step:
            return
        check(
            all_finite(state.model) and all(map(all_finite, state.ema.models.values())),
            f"refusing to save step {state.step}: the weights hold NaN or Inf; the previous "
            "checkpoint is kept",
        )
        torch_states = distributed.gather_objects(torch.get_rng_state())  # every rank's
        self.saved_at = state.step
        if not self.main:
            return
        tensors, meta = state.state_dict(torch_states)
        fixed_tensors, fixed_meta = self.constants
        save_checkpoint(
            self.directory,
            state.step,
            {**tensors, **fixed_tensors},
            {**fixed_meta, **meta, "threads": torch.get_num_threads()},
            keep=self.keep,
        )

    def load(self) -> tuple[Tensors, dict[str, Any]]:
        """The newest verified checkpoint's ``(tensors, meta)`` (one warning line names the
        newer ones that fail); call :meth:`set_aside_corrupt` once every rank has loaded."""
        _, tensors, meta, self._corrupt = find_latest_good(self.run_dir)
        self.saved_at = int(meta["step"])
        return tensors, meta

    def set_aside_corrupt(self) -> None:
        """Rename the corrupt checkpoints :meth:`load` skipped to ``*.corrupt`` (rank 0), so
        they are never taken for the latest again."""
        if self.main:
            for stem in self._corrupt:
                set_aside(stem)
        self._corrupt = []
