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

**The step.** :func:`train_step` is one optimizer step on a :class:`~meanflow.train.state.
TrainState`: learning rate ``lr_at(step)``, batch, its random inputs, forward and backward,
the global batch's statistics (one all-reduce, one device-to-host transfer), clipping, then
the optimizer and EMA updates, or none of them when the loss or gradient norm is not finite
(the step is counted as skipped). It writes nothing and logs nothing: it returns
:class:`StepStats`, which the loop and its hooks read.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config.schema import TrainConfig
from ..data.latents import draw_latents
from ..nn.forward_mode import in_forward_transform
from ..objectives.meanflow import Draws, MeanFlow, ObjectiveOutput

if TYPE_CHECKING:
    from .state import TrainState


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


@dataclass
class StepStats:
    """What one step measured: the global batch's mean loss and unweighted error, the gradient
    norm before clipping, whether any process was asked to stop, the micro-batches' ``(r, t)``."""

    loss: float
    mse: float
    grad_norm: float
    stop: bool
    times: list

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class StepParts:
    """What every step of a run uses and never changes: the configuration, the objective and
    its module (DDP-wrapped under torchrun), EDM's augmentation (or None), this rank's rows,
    the sample shape, the latents' description (or None), whether the data has labels."""

    cfg: TrainConfig
    loss_module: nn.Module
    objective: Any  # a MeanFlow, or a callable with its draw()
    augment: Any
    rows: Rows
    shape: tuple[int, ...]
    latents: dict | None = None
    labelled: bool = False

    @property
    def clip(self) -> float:
        return self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")


def _inputs(parts: StepParts, state: TrainState):
    """This rank's batch ``(x, y, cond)``, with its flips, latent draws or augmentation."""
    x, y = state.batches.next()
    y = y if parts.labelled else None  # a reader's labels, unconditional run
    gen, rows, cond = state.generator, parts.rows, None
    if parts.latents:  # the stored mirror image only with hflip (docs/latents.md)
        scale, shift = parts.latents["scaling_factor"], parts.latents.get("shift_factor")
        x = draw_latents(x, gen, scale, shift, parts.cfg.hflip, rows.total, rows.part)
    elif parts.cfg.hflip:
        x = flip_rows(x, gen, rows)
    if parts.augment is not None:  # EDM's pipeline; its labels condition the network
        x, aug = parts.augment(x, gen, total=rows.total, part=rows.part)
        cond = {"aug": aug}
    return x, y, cond


def train_step(parts: StepParts, state: TrainState, stop_requested: bool = False) -> StepStats:
    """One optimizer step (module docstring); ``stop_requested``: this process received a stop
    signal (shared with the others in the step's all-reduce)."""
    cfg, model, objective = parts.cfg, state.model, parts.objective
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.optim.lr_at(state.step, cfg.steps)
    x, y, cond = _inputs(parts, state)
    if hasattr(objective, "at_step"):  # a schedule (AlphaFlow's alpha)
        objective.at_step(state.step, cfg.steps)
    draws = objective.draw(
        cfg.batch_size, parts.shape, generator=state.generator, device=x.device, dtype=x.dtype
    )
    state.optimizer.zero_grad(set_to_none=True)
    loss_t, err_t, times = forward_backward(
        parts.loss_module, x, y, draws, parts.rows, cfg.grad_accum, cfg.precision, cond
    )
    flag = torch.tensor(float(stop_requested), device=loss_t.device)
    stats = torch.stack([loss_t.float(), err_t.float(), flag])
    world = parts.rows.world
    if world > 1:  # the global batch's mean loss; stop when any rank was told
        torch.distributed.all_reduce(stats)
        stats[:2] /= world
    grad_norm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), parts.clip)
    # one device-to-host transfer per step for everything the loop reads
    loss, mse, stop_votes, grad_norm = torch.cat([stats, grad_norm_t.reshape(1).to(stats)]).tolist()
    result = StepStats(loss, mse, grad_norm, stop_votes > 0, times)
    if not result.finite:
        state.skipped += 1  # its gradients are cleared at the next step's start
        return result
    state.optimizer.step()
    state.ema.update(model)
    state.step += 1
    return result
