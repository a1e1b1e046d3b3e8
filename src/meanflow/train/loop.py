"""The training loop: a :class:`~meanflow.train.state.TrainState` advanced by
:func:`~meanflow.train.step.train_step` until ``cfg.steps``, with hooks around it.

One step (step.py): draw a batch (and its labels; images optionally flipped), evaluate the
objective on ``grad_accum`` micro-batches (it draws noise, (r, t) and label dropout from the
run's own generator), backpropagate, optionally clip, step the optimizer, update the EMA. After
each step the hooks run (hooks.py): metrics go to ``metrics.jsonl``, checkpoints to
``checkpoints/`` (state.py, runs/checkpoint.py), and image runs write a sample grid from fixed
noise to ``samples/`` every ``grid_every`` steps, with ``loss.png``.

Reliability (docs/reliability.md): a checkpoint holds the whole training state, so a resumed
run is bitwise identical to an uninterrupted one; SIGTERM / SIGINT finish the current step,
save a checkpoint and stop; a step whose loss or gradient is not finite is skipped and counted,
and ``max_bad_steps`` in a row stop the run with a diagnostic and the last good state saved; a
checkpoint with non-finite weights is never written; resume uses the newest checkpoint whose
checksum matches and sets corrupt ones aside.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config.build import build_augment, build_model, build_objective, count_parameters
from ..config.schema import TrainConfig
from ..data import TrainingSet
from ..data.stream import StreamedBatches, TensorReader
from ..data.vae import latent_decoder
from ..errors import MeanFlowError, check, plural
from ..runs.directory import prepare_run_dir
from ..runs.run import Normalizer, TrainedRun
from ..runtime import distributed
from .batches import Batches, open_training_data
from .ema import EMA
from .hooks import Hook, MetricsLog, PreviewGrids, quality_probe, tensorboard_class
from .optimizer import build_optimizer
from .pictures import write_loss_curve, write_preview
from .reliability import StopSignals, trim_metrics
from .state import CheckpointManager, TrainState
from .step import CompiledForward, LossModule, Rows, StepParts, StepStats, train_step
from .warm_start import load_initial_weights


@dataclass
class TrainResult:
    run_dir: str
    step: int
    final_loss: float
    seconds: float
    skipped_steps: int
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    model: torch.nn.Module | None = None  # the trained network (raw weights), in train mode
    ema_model: torch.nn.Module | None = None  # its EMA, what sampling uses
    complete: bool = False  # a rerun of a finished run: nothing was trained


def train(
    cfg: TrainConfig,
    out: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    data: TrainingSet | None = None,
    objective=None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Train per ``cfg`` into run directory ``out`` (or continue it with ``resume``). ``data``:
    the training set already opened from ``cfg`` (by :func:`open_training_data`), if any;
    ``objective``: the objective to train (default: built from ``cfg``); ``hooks``: more
    :class:`~meanflow.train.hooks.Hook` objects, run after the run's own after every step.

    Under ``torchrun`` every process calls this; they share the work of each batch
    (step.py), rank 0 alone writes the run directory, and all resume from the same checkpoint."""
    cfg.validate()
    ranks, device = distributed.init(torch.device(device))
    main = ranks.is_main
    data = open_training_data(cfg) if data is None else data
    _check_data(cfg, data, ranks)
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = Rows(cfg.batch_size, ranks.rank, ranks.world_size)
    normalizer, batches = _open_batches(cfg, data, rows, device)
    model = _build_network(cfg, data, ranks, device)
    init_note = load_initial_weights(model, cfg.init) if cfg.init and not resume else ""
    objective = build_objective(cfg, cfg.num_classes) if objective is None else objective
    objective.check_inputs = False  # its draws are valid by construction: no host syncs
    augment = build_augment(cfg, model, data.kind)
    optimizer = build_optimizer(cfg, model)
    if progress and main:
        tqdm.write(_startup_line(cfg, model, objective, device, ranks), file=sys.stderr)
    if init_note and main:
        tqdm.write(f"meanflow: {init_note}", file=sys.stderr)
    ema = EMA(model, cfg.ema_decay, cfg.ema_extras, cfg.ema_every, cfg.ema_warmup)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    state = TrainState(model, ema, optimizer, batches, gen, rank=ranks.rank)
    writer_cls = tensorboard_class() if cfg.tensorboard and main else None
    constants = _constants(cfg, data, normalizer, ranks)
    checkpoints = CheckpointManager(
        out, cfg.ckpt_every, cfg.steps, cfg.keep_checkpoints, constants, main
    )
    if resume:
        _resume(state, checkpoints, cfg, data, out, main)
    elif main:
        prepare_run_dir(out, overwrite)
    distributed.barrier()  # the run directory is ready (or read) before any rank goes on
    checkpoints.set_aside_corrupt()  # every rank has read its checkpoint
    if main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    writer = writer_cls(os.path.join(out, "tensorboard")) if writer_cls else None
    net = CompiledForward(model) if cfg.compile else model
    loss_module: torch.nn.Module = LossModule(net, objective)
    if ranks.active:
        loss_module = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    parts = StepParts(
        cfg,
        loss_module,
        objective,
        augment,
        rows,
        data.shape,
        data.latents,
        data.labels is not None,
    )
    model.train()
    run = TrainedRun(
        ema.model, cfg, normalizer, state.step, "ema", data.shape, data.class_names,
        _decoder(data, device) if main else None, data.latents,
    )  # fmt: skip
    log, grids = (None, None)
    if main:
        log, grids = _main_hooks(cfg, out, run, data, device, state, writer, progress, ranks)
    # in this order: the metrics, the checkpoint, the pictures, then the caller's hooks
    every_step = [h for h in (log, checkpoints, grids) if h is not None] + list(hooks)
    start, bad, last_loss, stopped = time.perf_counter(), 0, math.nan, None
    stop, stop_all = StopSignals(), False
    try:
        with stop:
            while state.step < cfg.steps and not stop_all and (ranks.active or not stop.received):
                stats = train_step(parts, state, stop.received is not None)
                stop_all = stats.stop
                if not stats.finite:  # skipped; the NaN guard counts those in a row
                    bad += 1
                    if bad >= cfg.max_bad_steps:
                        if state.step > 0:
                            checkpoints.save(state)
                        raise MeanFlowError(_diagnose(bad, state.step, stats))
                    continue
                bad, last_loss = 0, stats.loss
                for hook in every_step:
                    hook.after_step(state, stats)
            stopped = stop.received or ("SIGTERM" if stop_all else None)
            if stopped is not None:
                checkpoints.save(state)
    finally:
        for hook in every_step:
            hook.close()
        batches.close()
    seconds = time.perf_counter() - start
    if stopped is None and main:
        _final_pictures(out, run, data, device)
    distributed.barrier()
    return TrainResult(
        out, state.step, last_loss, seconds, state.skipped, stopped, model, ema.model
    )


def _check_data(cfg: TrainConfig, data: TrainingSet, ranks: distributed.Dist) -> None:
    """Refuse a batch that does not split over the processes, a set smaller than a batch, and
    flips on data that is not images."""
    check(
        cfg.batch_size % ranks.world_size == 0
        and cfg.batch_size // ranks.world_size >= cfg.grad_accum,
        f"batch_size {cfg.batch_size} "
        f"must split evenly over {ranks.world_size} processes, each with at least grad_accum "
        f"{cfg.grad_accum} rows; change --batch-size or --nproc_per_node",
    )
    check(
        len(data) >= cfg.batch_size,
        f"the dataset has {plural(len(data), 'sample')}, "
        f"fewer than the batch size {cfg.batch_size}; lower --batch-size",
    )
    check(
        not cfg.hflip or data.kind == "images" or bool(data.latents),
        f"hflip needs images or latents, not {data.kind}",
    )
    check(
        not (cfg.hflip and data.latents and int(data.latents.get("flips", 1)) != 2),
        "hflip=true on latents needs their mirror images: encode with "
        "`meanflow latents encode --flip` (docs/latents.md), or drop hflip",
    )


def _open_batches(cfg: TrainConfig, data: TrainingSet, rows: Rows, device: torch.device):
    """``(normalizer, batches)``: the normalization fitted to vectors and arrays (when
    ``cfg.normalize``), and this process's batches, in memory or streamed."""
    if cfg.normalize and data.kind in ("vectors", "arrays"):
        assert data.x is not None  # vectors and arrays are held in memory
        normalizer = Normalizer.fit(data.x)
        x_data: torch.Tensor | None = normalizer.encode(data.x)
    else:
        normalizer = Normalizer.identity(data.shape)
        x_data = data.x  # None when the set is streamed
    batches: Batches | StreamedBatches
    if data.streamed or cfg.stream:
        reader = data.reader if x_data is None else TensorReader(x_data, data.labels)
        assert reader is not None  # a streamed set always has a reader
        batches = StreamedBatches(reader, cfg.batch_size, cfg.seed, rows.part, cfg.workers, device)
    else:
        assert x_data is not None  # not streamed: the data is in memory
        x_all = x_data.to(device)  # images: no copy
        labels = None if data.labels is None else data.labels.to(device)
        batches = Batches(x_all, cfg.batch_size, cfg.seed, labels, rows.part)
    return normalizer, batches


def _build_network(
    cfg: TrainConfig, data: TrainingSet, ranks: distributed.Dist, device: torch.device
) -> torch.nn.Module:
    """The network, initialised from ``cfg.seed``; each process then draws its own dropout
    masks. Dropout is refused where the objective runs the network more than once per row."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.shape, cfg.num_classes).to(device)
    if ranks.active:  # dropout masks differ between processes
        torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank)
    twice = (
        "loss.jvp=detached"
        if cfg.loss.jvp == "detached"
        else "loss.jvp_backend=finite-difference"
        if cfg.loss.jvp_backend == "finite-difference"
        else None
    )
    check(
        twice is None
        or not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()),
        f"{twice} runs the network more than once, so dropout masks would differ between the "
        "passes; use loss.jvp=subset with loss.jvp_backend=func or set model.dropout=0",
    )
    return model


def _startup_line(cfg: TrainConfig, model, objective, device, ranks: distributed.Dist) -> str:
    return (
        f"meanflow: preset {cfg.preset!r}: {type(model).__name__} with "
        f"{count_parameters(model):,} parameters, {type(objective).__name__}, data "
        f"{cfg.data} of shape {cfg.data_shape}"
        f"{f', {cfg.num_classes} classes' if cfg.num_classes else ''}"
        f"{_cpu_threads(device)}{_processes(ranks)}"
    )


def _constants(cfg: TrainConfig, data: TrainingSet, normalizer: Normalizer, ranks):
    """What every checkpoint of the run holds besides its state: the config, what the data is
    (shape, class names, latents' VAE) and its normalization (read by ``meanflow.runs``)."""
    meta = {
        "config": cfg.to_dict(),
        "shape": list(data.shape),
        "class_names": data.class_names,
        "world_size": ranks.world_size,
        **({"latents": data.latents} if data.latents else {}),
    }
    return normalizer.tensors(), meta


def _resume(
    state: TrainState,
    checkpoints: CheckpointManager,
    cfg: TrainConfig,
    data: TrainingSet,
    out: str,
    main: bool,
) -> None:
    """Load the newest verified checkpoint of ``out`` into ``state``."""
    tensors, meta = checkpoints.load()
    saved = tuple(meta.get("shape", [meta.get("dim")]))
    check(
        saved == data.shape,
        f"the data now has samples of shape {data.shape} but run "
        f"{out!r} was trained on {saved}; resume with the same data",
    )
    state.load_state_dict(tensors, meta)
    check(
        state.step < cfg.steps,
        f"run {out!r} already finished {plural(state.step, 'step')}; pass a "
        "larger --steps to continue training",
    )
    if main:
        trim_metrics(os.path.join(out, "metrics.jsonl"), state.step)


def _main_hooks(cfg, out, run, data, device, state, writer, progress, ranks) -> tuple[Hook, Hook]:
    """Rank 0's hooks: the metrics log (with the progress bar) and the preview grids."""
    bar = tqdm(
        total=cfg.steps,
        initial=state.step,
        disable=not progress,
        dynamic_ncols=True,
        desc=f"{cfg.objective} {cfg.data}",
        unit="step",
    )
    probe = quality_probe(run, data, device, cfg.seed, cfg.grid_every)
    log = MetricsLog(out, cfg.log_every, cfg.steps, bar, writer, probe, ranks.world_size)
    return log, PreviewGrids(out, run, device, cfg.grid_every, writer)


def _final_pictures(out: str, run: TrainedRun, data: TrainingSet, device) -> None:
    """``samples-1step.png`` (beside the data for vectors) and ``loss.png``."""
    cfg, reference = run.config, None
    if data.kind == "vectors":
        assert data.x is not None  # vector sets are held in memory
        reference = data.x[: cfg.sample_num].numpy()
    write_preview(os.path.join(out, "samples-1step.png"), run, device, reference, cfg.seed)
    write_loss_curve(out, f"{cfg.objective} on {cfg.data}")


def _diagnose(count: int, step: int, stats: StepStats) -> str:
    """One line on a run stopped by non-finite steps: where, which quantity, the batch's times."""
    r = torch.cat([p[0] for p in stats.times]).float()
    t = torch.cat([p[1] for p in stats.times]).float()
    which = (
        f"loss {stats.loss}"
        if not math.isfinite(stats.loss)
        else f"gradient norm {stats.grad_norm}"
    )
    saved = step > 0
    where = f"the last good state (step {step}) is saved" if saved else "no checkpoint was written"
    return (
        f"{count} consecutive non-finite steps at step {step}: {which}; the last batch had "
        f"t in [{t.min():.4g}, {t.max():.4g}], r in [{r.min():.4g}, {r.max():.4g}]; {where}; "
        "lower optim.lr, set optim.grad_clip, or check the data"
    )


def _processes(ranks: distributed.Dist) -> str:
    """``", in N processes"`` for the start-up line of a torchrun run."""
    return f", in {ranks.world_size} processes (DDP)" if ranks.active else ""


def _decoder(data: TrainingSet, device):
    """For a latent set, a function from latents to images in [-1, 1] (the set's VAE), or
    None when its VAE cannot be loaded here (then previews show nothing)."""
    if not data.latents:
        return None
    return latent_decoder(data.latents, device, required=False)


def _cpu_threads(device: torch.device) -> str:
    """``", on N CPU threads"`` for the start-up line of a CPU run (results of some networks
    differ in the last bits between thread counts: docs/reliability.md)."""
    n = torch.get_num_threads()
    return f", on {n} CPU thread{'s' * (n != 1)}" if device.type == "cpu" else ""
