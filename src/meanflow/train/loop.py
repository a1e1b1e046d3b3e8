"""The training loop: batches, objective, optimizer, EMA, logging and checkpoints.

One step: draw a batch (and its labels; images optionally flipped), evaluate the objective on
``grad_accum`` micro-batches (it draws noise, (r, t) and label dropout from the run's own
generator), backpropagate, optionally clip, step the optimizer, update the EMA. Metrics go to
``metrics.jsonl``, checkpoints to ``checkpoints/`` (see checkpoint.py), and image runs write a
sample grid from fixed noise to ``samples/`` every ``grid_every`` steps, with ``loss.png``.

Reliability (docs/reliability.md): a checkpoint holds every random state, so a resumed run is
bitwise identical to an uninterrupted one; SIGTERM / SIGINT finish the current step, save a
checkpoint and stop; a step whose loss or gradient is not finite is skipped and counted, and
``max_bad_steps`` in a row stop the run with a diagnostic and the last good state saved; a
checkpoint with non-finite weights is never written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config.build import build_augment, build_model, build_objective, count_parameters
from ..config.schema import TrainConfig
from ..data import TrainingSet
from ..data.latents import draw_latents
from ..data.stream import StreamedBatches, TensorReader
from ..data.vae import latent_decoder
from ..errors import MeanFlowError, check, plural
from ..eval.distances import sliced_wasserstein
from ..runs.checkpoint import (
    load_latest_good,
    load_optimizer,
    optimizer_tensors,
    prefixed,
    save_checkpoint,
)
from ..runs.directory import prepare_run_dir
from ..runs.run import Normalizer, TrainedRun
from ..runtime import distributed
from .batches import Batches, open_training_data
from .ema import EMA
from .optimizer import build_optimizer
from .pictures import write_loss_curve, write_preview
from .reliability import (
    StopSignals,
    all_finite,
    host_rng_state,
    memory_mib,
    restore_host_rng,
    trim_metrics,
)
from .step import CompiledForward, LossModule, Rows, flip_rows, forward_backward


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
) -> TrainResult:
    """Train per ``cfg`` into run directory ``out`` (or continue it with ``resume``). ``data``:
    the training set already opened from ``cfg`` (by :func:`open_training_data`), if any.

    Under ``torchrun`` every process calls this; they share the work of each batch
    (step.py), rank 0 alone writes the run directory, and all resume from the same checkpoint."""
    cfg.validate()
    ranks, device = distributed.init(torch.device(device))
    main = ranks.is_main
    check(
        cfg.batch_size % ranks.world_size == 0
        and cfg.batch_size // ranks.world_size >= cfg.grad_accum,
        f"batch_size {cfg.batch_size} "
        f"must split evenly over {ranks.world_size} processes, each with at least grad_accum "
        f"{cfg.grad_accum} rows; change --batch-size or --nproc_per_node",
    )
    data = open_training_data(cfg) if data is None else data
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
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = Rows(cfg.batch_size, ranks.rank, ranks.world_size)
    fit = cfg.normalize and data.kind in ("vectors", "arrays")
    if fit:
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
    objective = build_objective(cfg, cfg.num_classes)
    objective.check_inputs = False  # its draws are valid by construction: no host syncs
    augment = build_augment(cfg, model, data.kind)
    optimizer = build_optimizer(cfg, model)
    if progress and main:
        tqdm.write(
            f"meanflow: preset {cfg.preset!r}: {type(model).__name__} with "
            f"{count_parameters(model):,} parameters, {type(objective).__name__}, data "
            f"{cfg.data} of shape {cfg.data_shape}"
            f"{f', {cfg.num_classes} classes' if cfg.num_classes else ''}"
            f"{_cpu_threads(device)}{_processes(ranks)}",
            file=sys.stderr,
        )
    ema = EMA(model, cfg.ema_decay, cfg.ema_extras, cfg.ema_every, cfg.ema_warmup)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step, skipped = 0, 0
    writer_cls = _tensorboard() if cfg.tensorboard and main else None

    if resume:
        stem, tensors, meta = load_latest_good(out)
        saved = tuple(meta.get("shape", [meta.get("dim")]))
        check(
            saved == data.shape,
            f"the data now has samples of shape {data.shape} but run "
            f"{out!r} was trained on {saved}; resume with the same data",
        )
        model.load_state_dict(prefixed(tensors, "model"))
        ema.load(tensors, meta)
        load_optimizer(optimizer, tensors, meta["optimizer"])
        gen.set_state(tensors["rng.generator"].to(gen.get_state().device))
        own = f"rng.torch.rank{ranks.rank}" if ranks.rank else "rng.torch"
        torch.set_rng_state(tensors.get(own, tensors["rng.torch"]))
        restore_host_rng(meta.get("rng"), tensors)
        batches.load_state(meta["batches"])
        step, skipped = meta["step"], meta["skipped_steps"]
        check(
            step < cfg.steps,
            f"run {out!r} already finished {plural(step, 'step')}; pass a "
            "larger --steps to continue training",
        )
        if main:
            trim_metrics(os.path.join(out, "metrics.jsonl"), step)
    elif main:
        prepare_run_dir(out, overwrite)
    distributed.barrier()  # the run directory is ready (or read) before any rank goes on
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

    def checkpoint() -> None:
        check(
            all_finite(model) and all(map(all_finite, ema.models.values())),
            f"refusing to "
            f"save step {step}: the weights hold NaN or Inf; the previous checkpoint is kept",
        )
        rng_meta, rng_tensors = host_rng_state()
        own = torch.get_rng_state()
        states = distributed.gather_objects(own)  # every rank's dropout RNG
        if not main:
            return
        tensors = {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **ema.tensors(),  # ema.* (primary), ema-<decay>.* (extras)
            **normalizer.tensors(),
            **rng_tensors,
            "rng.generator": gen.get_state(),
            "rng.torch": own,
            **{f"rng.torch.rank{k}": v for k, v in enumerate(states) if k},
        }
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        save_checkpoint(
            os.path.join(out, "checkpoints"),
            step,
            tensors,
            {
                "config": cfg.to_dict(),
                "optimizer": optim_meta,
                "batches": batches.state(),
                **ema.state(),
                "skipped_steps": skipped,
                "shape": list(data.shape),
                "class_names": data.class_names,
                "rng": rng_meta,
                "threads": torch.get_num_threads(),
                "world_size": ranks.world_size,
                **({"latents": data.latents} if data.latents else {}),
            },
            keep=cfg.keep_checkpoints,
        )

    model.train()
    run = TrainedRun(
        ema.model,
        cfg,
        normalizer,
        step,
        "ema",
        data.shape,
        data.class_names,
        _decoder(data, device) if main else None,
        data.latents,
    )
    quality, floor = _quality_probe(run, data, device, cfg.seed) if main else (None, None)
    log = open(os.path.join(out, "metrics.jsonl"), "a") if main else None
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (progress and main),
        dynamic_ncols=True,
        desc=f"{cfg.objective} {cfg.data}",
        unit="step",
    )
    start, window_start, window = time.perf_counter(), time.perf_counter(), []
    consecutive_bad, last_loss, saved_at = 0, math.nan, (step if resume else None)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    stop, stop_all = StopSignals(), False
    try:
        with stop:
            while step < cfg.steps and not stop_all and (ranks.active or stop.received is None):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optim.lr_at(step, cfg.steps)
                x, y = batches.next()
                y = None if data.labels is None else y  # a reader's labels, unconditional run
                if data.latents:
                    # the stored mirror image only with hflip (docs/latents.md)
                    x = draw_latents(
                        x,
                        gen,
                        data.latents["scaling_factor"],
                        data.latents.get("shift_factor"),
                        cfg.hflip,
                        rows.total,
                        rows.part,
                    )
                elif cfg.hflip:
                    x = flip_rows(x, gen, rows)
                cond = None
                if augment is not None:  # EDM's pipeline; its labels condition the network
                    x, aug = augment(x, gen, total=rows.total, part=rows.part)
                    cond = {"aug": aug}
                if hasattr(objective, "at_step"):  # a schedule (AlphaFlow's alpha)
                    objective.at_step(step, cfg.steps)
                draws = objective.draw(
                    cfg.batch_size, data.shape, generator=gen, device=device, dtype=x.dtype
                )
                optimizer.zero_grad(set_to_none=True)
                loss_t, err_t, times = forward_backward(
                    loss_module, x, y, draws, rows, cfg.grad_accum, cfg.precision, cond
                )
                stats = torch.stack(
                    [
                        loss_t.float(),
                        err_t.float(),
                        torch.tensor(float(stop.received is not None), device=loss_t.device),
                    ]
                )
                if ranks.active:  # the global batch's mean loss; stop when any rank was told
                    torch.distributed.all_reduce(stats)
                    stats[:2] /= ranks.world_size
                grad_norm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                # one device-to-host transfer per step for everything the loop reads
                loss, mse, stop_votes, grad_norm = torch.cat(
                    [stats, grad_norm_t.reshape(1).to(stats)]
                ).tolist()
                stop_all = stop_votes > 0
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    skipped += 1  # its gradients are cleared at the next step's start
                    consecutive_bad += 1
                    if consecutive_bad >= cfg.max_bad_steps:
                        if step > 0 and saved_at != step:
                            checkpoint()
                        raise MeanFlowError(
                            _diagnose(consecutive_bad, step, loss, grad_norm, times, step > 0)
                        )
                    continue
                consecutive_bad = 0
                optimizer.step()
                ema.update(model)
                step += 1
                last_loss = loss
                if main:
                    window.append((loss, mse, grad_norm))
                bar.update(1)
                if main and (step % cfg.log_every == 0 or step == cfg.steps):
                    now = time.perf_counter()
                    mean = [sum(w[i] for w in window) / len(window) for i in range(3)]
                    record = {
                        "step": step,
                        "loss": mean[0],
                        "mse": mean[1],
                        "grad_norm": mean[2],
                        "steps_per_s": len(window) / max(now - window_start, 1e-9),
                        "lr": optimizer.param_groups[0]["lr"],
                        "skipped": skipped,
                        "elapsed_s": now - start,
                        "memory_mib": memory_mib(),
                        "threads": torch.get_num_threads(),
                    }
                    if ranks.active:
                        record["world_size"] = ranks.world_size
                    if quality is not None:
                        record.update(swd_1step=quality(), swd_floor=floor)
                    assert log is not None  # opened on the main process
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{mean[0]:.4f}", mse=f"{mean[1]:.4f}")
                    if writer is not None:
                        for key in ("loss", "mse", "grad_norm", "lr", "steps_per_s", "swd_1step"):
                            if key in record:
                                writer.add_scalar(f"train/{key}", record[key], step)
                    window, window_start = [], now
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    checkpoint()
                    saved_at = step
                if main and run.is_image and cfg.grid_every and step % cfg.grid_every == 0:
                    _grid(out, run, device, step, writer)
            stopped = stop.received or ("SIGTERM" if stop_all else None)
            if stopped is not None and saved_at != step:
                checkpoint()
    finally:
        bar.close()
        if log is not None:
            log.close()
        batches.close()
    seconds = time.perf_counter() - start
    if stopped is None and main:
        reference = None
        if data.kind == "vectors":
            assert data.x is not None  # vector sets are held in memory
            reference = data.x[: cfg.sample_num].numpy()
        write_preview(os.path.join(out, "samples-1step.png"), run, device, reference, cfg.seed)
        write_loss_curve(out, f"{cfg.objective} on {cfg.data}")
    if writer is not None:
        writer.close()
    distributed.barrier()
    return TrainResult(out, step, last_loss, seconds, skipped, stopped, model, ema.model)


def _processes(ranks: distributed.Dist) -> str:
    """``", in N processes"`` for the start-up line of a torchrun run."""
    return f", in {ranks.world_size} processes (DDP)" if ranks.active else ""


def _decoder(data: TrainingSet, device):
    """For a latent set, a function from latents to images in [-1, 1] (the set's VAE), or
    None when its VAE cannot be loaded here (then previews show nothing)."""
    if not data.latents:
        return None
    return latent_decoder(data.latents, device, required=False)


def _quality_probe(run: TrainedRun, data: TrainingSet, device, seed: int):
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


def _cpu_threads(device: torch.device) -> str:
    """``", on N CPU threads"`` for the start-up line of a CPU run (results of some networks
    differ in the last bits between thread counts: docs/reliability.md)."""
    n = torch.get_num_threads()
    return f", on {n} CPU thread{'s' * (n != 1)}" if device.type == "cpu" else ""


def _diagnose(count: int, step: int, loss: float, grad_norm: float, times, saved: bool) -> str:
    """One line on a run stopped by non-finite steps: where, which quantity, the batch's times."""
    r = torch.cat([p[0] for p in times]).float()
    t = torch.cat([p[1] for p in times]).float()
    which = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    where = f"the last good state (step {step}) is saved" if saved else "no checkpoint was written"
    return (
        f"{count} consecutive non-finite steps at step {step}: {which}; the last batch had "
        f"t in [{t.min():.4g}, {t.max():.4g}], r in [{r.min():.4g}, {r.max():.4g}]; {where}; "
        "lower optim.lr, set optim.grad_clip, or check the data"
    )


def _grid(out: str, run: TrainedRun, device, step: int, writer) -> None:
    """``samples/step-N.png`` (one-step EMA samples from the run's fixed noise) and loss.png."""
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    path = write_preview(
        os.path.join(out, "samples", f"step-{step:08d}.png"), run, device, seed=run.config.seed
    )
    write_loss_curve(out, f"{run.config.objective} on {run.config.data}")
    if writer is not None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            writer.add_image(
                "samples/one_step", np.asarray(image.convert("RGB")), step, dataformats="HWC"
            )


def _tensorboard():
    """TensorBoard's SummaryWriter class, or one clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MeanFlowError(
            "tensorboard=true needs the tensorboard package; run "
            "`pip install 'meanflow[tensorboard]'` or drop --tensorboard"
        ) from None
    return SummaryWriter
