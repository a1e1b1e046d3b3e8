"""One optimizer step's forward and backward, the same in one process and under DDP.

**The global batch.** Every process draws the random inputs of the *whole* batch from the run's
generator (identical on every rank): flips, latent posterior noise, label dropout, noise,
``(r, t)``. Rank ``k`` of ``W`` then keeps rows ``[k B/W, (k+1) B/W)`` and splits them into
``grad_accum`` micro-batches. Each row therefore sees the same data and randomness whatever
the number of processes or micro-batches, and the averaged gradient is the single-process,
full-batch gradient up to floating-point summation order (tests/test_distributed.py).

**Gradient sync.** ``torch.func.jvp`` cannot run through the DDP wrapper, and running it on
``ddp.module`` skips DDP's forward, so its backward hooks never all-reduce the gradients.
Here the whole objective, JVP included, is the ``forward`` of :class:`LossModule`, and DDP
wraps that module: DDP's forward runs (the JVP happens inside it, on the plain network), then
backward all-reduces every gradient as usual. Inner micro-batches run under ``no_sync()``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.forward_mode import in_forward_transform
from ..objectives.meanflow import Draws, MeanFlow, ObjectiveOutput


class CompiledForward(nn.Module):
    """``model`` with its plain forward passes run through ``torch.compile``, and its calls inside
    the objective's JVP (``torch.func`` transforms or forward-AD dual tensors) run eagerly on the
    same parameters.

    Dynamo cannot trace a compiled module called inside ``torch.func.jvp`` from eager code
    (pytorch/pytorch#128711): it falls back to eager and, when the JVP is the first call, marks
    the network's frames as skipped, so a bare ``torch.compile(model)`` left every pass eager.
    Compiling the JVP itself fails in the backward on PyTorch 2.13 (pytorch/pytorch#177261).
    Measured in tests/test_compile.py and docs/benchmarks.md."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "compiled", torch.compile(model))  # not a second submodule

    def forward(self, *args, **kwargs):
        if in_forward_transform():  # inside the JVP (torch.func or forward-AD dual tensors)
            return self.model(*args, **kwargs)
        return self.compiled(*args, **kwargs)


class LossModule(nn.Module):
    """``forward(x, y, **draws)`` = ``objective(model, x, y, **draws)``: the objective as a
    module, so DistributedDataParallel can wrap it (see the module docstring)."""

    def __init__(self, model: nn.Module, objective: MeanFlow) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
        **draws: torch.Tensor | None,
    ) -> ObjectiveOutput:
        # draws holds only tensor keywords (noise, r, t, drop, guide), never ``generator``
        return self.objective(self.model, x, y, cond=cond, **draws)  # type: ignore[arg-type]


@dataclass
class Rows:
    """This process's share of a global batch of ``total`` rows: ``rank`` of ``world``."""

    total: int
    rank: int = 0
    world: int = 1

    @property
    def part(self) -> slice:
        size = self.total // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def micro(self, i: int, count: int) -> slice:
        """Micro-batch ``i`` of ``count``, as a slice of this rank's rows."""
        size = self.total // self.world
        return slice(i * size // count, (i + 1) * size // count)


def flip_rows(x: torch.Tensor, gen: torch.Generator, rows: Rows) -> torch.Tensor:
    """Mirror each image of this rank's rows left-right with probability 1/2 (the coin is drawn
    for the global batch)."""
    coin = torch.rand(rows.total, generator=gen, device=x.device)[rows.part] < 0.5
    return torch.where(coin[:, None, None, None], x.flip(-1), x)


def forward_backward(
    loss_module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    draws: Draws,
    rows: Rows,
    grad_accum: int,
    precision: str,
    cond: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Run this rank's micro-batches and backpropagate their gradients (summed so that the
    all-reduced average is the full batch's mean-loss gradient). ``x``, ``y`` are this rank's
    rows, ``draws`` the global batch's. Returns this rank's mean loss and mean unweighted error
    (0-d tensors) and the micro-batches' ``(r, t)``. ``cond``: more per-row network inputs of
    this rank's rows (EDM's augmentation labels)."""
    draws = draws.rows(rows.part)
    losses, errs, times = [], [], []
    sync = getattr(loss_module, "no_sync", None)
    device = x.device.type
    for i in range(grad_accum):
        part = rows.micro(i, grad_accum)
        inner = sync() if sync is not None and i < grad_accum - 1 else nullcontext()
        with inner, torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = loss_module(
                x[part],
                None if y is None else y[part],
                {k: v[part] for k, v in cond.items()} if cond else None,
                **draws.rows(part).kwargs(),
            )
        share = (part.stop - part.start) / len(x)  # of this rank's rows
        (out.loss * share).backward()
        losses.append(out.loss.detach() * share)
        errs.append(out.err.sum() / len(x))
        times.append((out.r, out.t))
    return torch.stack(losses).sum(), torch.stack(errs).sum(), times
