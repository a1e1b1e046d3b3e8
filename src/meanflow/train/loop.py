"""The training loop: batches, objective, optimizer, EMA, logging and checkpoints.

One step: draw a batch, evaluate the objective (it draws noise and (r, t) from the run's own
generator), backpropagate, optionally clip, step the optimizer, update the EMA. A step whose
loss or gradient is not finite is skipped and counted. Metrics go to ``metrics.jsonl``,
checkpoints to ``checkpoints/``; see checkpoint.py for their layout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..data import load_vectors
from ..errors import MeanFlowError, check
from .checkpoint import (latest_checkpoint, load_checkpoint, load_optimizer, optimizer_tensors,
                         prefixed, save_checkpoint)
from .config import TrainConfig
from .ema import EMA
from .factory import build_model, build_objective, build_optimizer
from .run import RUN_FILES, Normalizer, write_sample_plot

MAX_CONSECUTIVE_BAD_STEPS = 20


class Batches:
    """Shuffled mini-batches without replacement; one permutation per epoch, seeded by
    ``(seed, epoch)`` so the position ``(epoch, index)`` is all a checkpoint needs."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.data.shape[0], generator=g).to(self.data.device)

    def next(self) -> torch.Tensor:
        if self.index + self.batch_size > self.data.shape[0]:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self.data[idx]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation()


@dataclass
class TrainResult:
    run_dir: str
    step: int
    final_loss: float
    seconds: float
    skipped_steps: int


def prepare_run_dir(out: str, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty one unless ``overwrite`` (then only our files go)."""
    if os.path.isfile(out):
        raise MeanFlowError(f"--out {out!r} is an existing file; give a directory path")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise MeanFlowError(f"run directory {out!r} already exists and is not empty; pass "
                                "--resume to continue it, --overwrite to replace it, or another --out")
        for name in RUN_FILES:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)


def train(cfg: TrainConfig, out: str, *, resume: bool = False, overwrite: bool = False,
          device: torch.device | str = "cpu", progress: bool = True) -> TrainResult:
    """Train per ``cfg`` into run directory ``out`` (or continue it with ``resume``)."""
    cfg.validate()
    device = torch.device(device)
    data = load_vectors(cfg.data, num=cfg.num_data, seed=cfg.seed)
    check(data.shape[0] >= cfg.batch_size, f"the dataset has {data.shape[0]} samples, fewer than "
          f"the batch size {cfg.batch_size}; lower --batch-size")
    normalizer = Normalizer.fit(data) if cfg.normalize else Normalizer.identity(data.shape[1])
    x_all = normalizer.encode(torch.from_numpy(data)).to(device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.shape[1]).to(device)
    objective = build_objective(cfg)
    optimizer = build_optimizer(cfg, model)
    ema = EMA(model, cfg.ema_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    batches = Batches(x_all, cfg.batch_size, cfg.seed)
    step, skipped = 0, 0

    if resume:
        stem = latest_checkpoint(out)
        tensors, meta = load_checkpoint(stem)
        model.load_state_dict(prefixed(tensors, "model"))
        ema.model.load_state_dict(prefixed(tensors, "ema"))
        load_optimizer(optimizer, tensors, meta["optimizer"])
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        batches.load_state(meta["batches"])
        ema.updates, step, skipped = meta["ema_updates"], meta["step"], meta["skipped_steps"]
        check(step < cfg.steps, f"run {out!r} already finished {step} steps; pass a larger "
              "--steps to continue training")
    else:
        prepare_run_dir(out, overwrite)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)

    def checkpoint() -> None:
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in ema.model.state_dict().items()},
                   **normalizer.tensors(),
                   "rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()}
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        save_checkpoint(os.path.join(out, "checkpoints"), step, tensors,
                        {"config": cfg.to_dict(), "optimizer": optim_meta,
                         "batches": batches.state(), "ema_updates": ema.updates,
                         "skipped_steps": skipped, "dim": data.shape[1]},
                        keep=cfg.keep_checkpoints)

    model.train()
    log = open(os.path.join(out, "metrics.jsonl"), "a")
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True,
               desc=f"{cfg.objective} {cfg.data}", unit="step")
    start, window_start, window = time.perf_counter(), time.perf_counter(), []
    consecutive_bad, last_loss = 0, math.nan
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    try:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr_at(step, cfg.steps)
            x = batches.next()
            out_obj = objective(model, x, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            out_obj.loss.backward()
            grad_norm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            # one device-to-host transfer per step for everything the loop reads
            loss, mse, grad_norm = torch.stack(
                [out_obj.loss.detach(), out_obj.err.mean(), grad_norm_t]).tolist()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                skipped += 1
                consecutive_bad += 1
                optimizer.zero_grad(set_to_none=True)
                if consecutive_bad >= MAX_CONSECUTIVE_BAD_STEPS:
                    raise MeanFlowError(f"{consecutive_bad} consecutive non-finite steps at step "
                                        f"{step} (loss {loss}, grad norm {grad_norm}); lower "
                                        "optim.lr or set optim.grad_clip")
                continue
            consecutive_bad = 0
            optimizer.step()
            ema.update(model)
            step += 1
            last_loss = loss
            window.append((loss, mse, grad_norm))
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                mean = [sum(w[i] for w in window) / len(window) for i in range(3)]
                record = {"step": step, "loss": mean[0], "mse": mean[1], "grad_norm": mean[2],
                          "steps_per_s": len(window) / max(now - window_start, 1e-9),
                          "lr": optimizer.param_groups[0]["lr"], "skipped": skipped,
                          "elapsed_s": now - start}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{mean[0]:.4f}", mse=f"{mean[1]:.4f}")
                window, window_start = [], now
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - start
    write_sample_plot(out, ema.model, normalizer, cfg, device, data[:cfg.sample_num])
    return TrainResult(out, step, last_loss, seconds, skipped)
