"""Start a new run's network from another run's weights (``init``, ``meanflow train --init``).

The new run copies the network weights of ``init`` (a ``meanflow train`` run directory, its
newest good checkpoint, or a folder written by ``meanflow export``): the primary EMA, the weights
that run samples with. Everything else starts fresh: step 0, a new optimizer and learning-rate
schedule, the EMA equal to the copied weights, the run's own seed for data order, noise and
times. The typical use is to turn a flow-matching run into a MeanFlow one by fine-tuning, as
Decoupled MeanFlow does (Lee, Yu, Shin 2025, arXiv 2510.24474: "training flow models and
subsequently converting them is more efficient than training flow maps from scratch"): a network
trained with r = t gives ``u(z, r, t) ~ v(z, t)`` at the start, and the MeanFlow objective then
teaches it the average over ``[r, t]``.

The two networks must be the same: the same architecture settings (``model.*``), data shape and
number of classes; any difference is refused with the first differing weight named. A resumed
run continues from its own checkpoint and never reads ``init`` again.
"""

from __future__ import annotations

import torch

from ..errors import check
from ..runs.load import load_run

__all__ = ["load_initial_weights"]


def load_initial_weights(model: torch.nn.Module, source: str) -> str:
    """Copy the EMA weights of run ``source`` into ``model`` (in place) and return a line that
    says where they came from. Raises :class:`~meanflow.errors.MeanFlowError` when ``source``
    is not a run or its network differs from ``model``."""
    run = load_run(source, "ema", "cpu")
    theirs = run.model.state_dict()
    ours = model.state_dict()
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [
        f"{k}: {tuple(theirs[k].shape)} in {source!r}, {tuple(v.shape)} here"
        for k, v in ours.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    problem = (
        shapes[0]
        if shapes
        else f"{missing[0]} is missing from {source!r}"
        if missing
        else f"{extra[0]} of {source!r} has no place here"
        if extra
        else ""
    )
    check(
        not problem,
        f"--init {source!r}: its network ({run.config.model.arch}, "
        f"{run.config.data_shape}, {run.config.num_classes} classes) does not match this "
        f"run's ({problem}); train with the same model settings, data shape and classes as "
        f"{source!r}",
    )
    model.load_state_dict(theirs)  # the same keys and shapes: checked above
    return (
        f"network initialised from {source!r} ({run.config.objective}, step {run.step}, "
        f"{run.weights} weights)"
    )
