"""The per-row plumbing the objectives share: a batch's random draws (:class:`Draws`), what an
evaluation returns (:class:`ObjectiveOutput`), a model with per-row inputs bound
(:class:`Conditioned`), row subsets (:func:`rows_first`) and evaluation mode for the
stop-gradient network terms (:func:`evaluation_mode`).

A slice of a batch's draws gives those rows the losses the whole batch would, which is how
gradient accumulation and data-parallel training compute the full-batch objective.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class Draws:
    """The random inputs of one batch: noise (B, ...), times ``r``, ``t`` (B,) and, for guided
    objectives, the label-dropout mask (B,) (None otherwise) and, with guidance inputs
    (:class:`meanflow.objectives.imf.GuidanceInputs`), each row's ``(omega, t_min, t_max)``
    (B, 3)."""

    noise: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor | None = None
    guide: torch.Tensor | None = None

    def rows(self, part: slice) -> Draws:
        """The draws of rows ``part`` (a slice of the batch)."""
        values: list[Any] = [
            None if getattr(self, f.name) is None else getattr(self, f.name)[part]
            for f in fields(self)
        ]
        return Draws(*values)

    def kwargs(self) -> dict:
        """Keyword arguments for an objective call: ``objective(model, x, y, **d.kwargs())``."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "guide" or self.guide is not None
        }


@dataclass
class ObjectiveOutput:
    """What one objective evaluation produced (all per-sample tensors have leading dim B)."""

    loss: torch.Tensor  # scalar, mean of ``per_sample``; backpropagate this
    per_sample: torch.Tensor  # (B,) weighted loss err / sg((err + c)^p)
    err: torch.Tensor  # (B,) squared error summed over non-batch dims (unweighted)
    u: torch.Tensor  # network output, with autograd graph
    target: torch.Tensor  # regression target, detached
    r: torch.Tensor  # (B,)
    t: torch.Tensor  # (B,)


class Conditioned(torch.nn.Module):
    """``model`` with per-row keyword inputs bound: ``Conditioned(net, {"aug": a})(z, r, t, y)``
    calls ``net(z, r, t, y=y, aug=a)``; :meth:`rows` keeps the inputs of some rows, so the
    objective can split a batch (e.g. the r != t rows for the JVP) without knowing them. Used
    for EDM's augmentation labels (``cond`` of an objective call) and guidance inputs."""

    def __init__(self, net, cond: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.net, self.cond = net, cond

    def forward(self, z, r, t, y=None):
        return self.net(z, r, t, y=y, **self.cond)

    def rows(self, idx: torch.Tensor) -> Conditioned:
        return Conditioned(self.net, {k: v[idx] for k, v in self.cond.items()})


def rows_first(mask: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(count, order)``: how many rows ``mask`` selects (the one host sync) and a row order
    with those rows first, each group in its original order."""
    return int(mask.sum()), torch.argsort(mask.to(torch.int8), descending=True, stable=True)


def _rows(a: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """``a[idx]``, or None for absent (optional) labels."""
    return None if a is None else a[idx]


def _sub(model, idx: torch.Tensor):
    """The model for rows ``idx`` of the batch (per-row inputs of a :class:`Conditioned`)."""
    return model.rows(idx) if isinstance(model, Conditioned) else model


@contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the stop-gradient network terms (guidance,
    iMF's tangent), as the authors' train=False; every submodule's own mode is restored
    afterwards. Plain callables pass through."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
