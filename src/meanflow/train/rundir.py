"""What ``meanflow train`` does with its run directory, as a library: new run, resume, rerun of
the same command, start over, or refuse; then train under the directory's lock.

The policy (docs/reliability.md, "Run directories"):
- a new or empty directory starts a new run;
- ``resume`` continues the newest good checkpoint; only ``steps`` may change;
- rerunning the command of an existing run continues it when the settings match (a finished
  run is complete: its pictures are redrawn, nothing is trained), and is refused otherwise,
  naming each differing key with its saved and its new value;
- ``overwrite`` replaces the run files (only those: :data:`~meanflow.runs.directory.RUN_FILES`);
- ``restart_if_changed`` (for scripts such as the demo) starts over only a run that it created
  itself, of the same data, that has not finished; anything else is refused with one line;
- nothing is written before the directory's lock (:mod:`meanflow.runs.lock`) is held.

:func:`fit` is the Python form of ``meanflow train``; the command line only parses.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.overrides import flatten
from ..config.presets import PRESETS, configure, default_preset
from ..config.schema import TrainConfig
from ..data import TrainingSet
from ..errors import MeanFlowError, check, plural
from ..runs.checkpoint import list_checkpoints, load_latest_good
from ..runs.directory import ORIGIN_NAME, check_run_dir
from ..runs.load import load_run
from ..runs.lock import LOCK_NAME, hold_lock, refuse_file
from ..runtime import distributed
from ..runtime.devices import resolve_device
from .batches import open_training_data, record_data
from .loop import TrainResult, train
from .pictures import write_loss_curve, write_preview
from .reliability import last_metrics

# keys that decide which samples open_training_data reads
_DATA_KEYS = ("data", "data_dir", "image_size", "num_data", "seed", "stream")
# keys filled in from the data, not chosen by the user
_DERIVED = ("steps", "data_shape", "num_classes")

Settings = Iterable[tuple[str, Any]]


def _stderr(message: str) -> None:
    print(f"meanflow: {message}", file=sys.stderr)


@dataclass
class RunRequest:
    """What was asked of a run directory: ``meanflow train``'s options, parsed."""

    out: str | None
    settings: list[tuple[str, Any]] = field(default_factory=list)  # dotted keys, in order
    preset: str | None = None
    steps: int | None = None
    resume: bool = False
    overwrite: bool = False
    restart_if_changed: bool = False
    dry_run: bool = False

    @property
    def has_data(self) -> bool:
        return any(k == "data" for k, _ in self.settings)


@dataclass
class RunPlan:
    """What will happen: train ``cfg`` (resuming or not, replacing run files or not), or
    nothing (``complete``: the run has already trained ``cfg.steps``)."""

    cfg: TrainConfig
    data: TrainingSet | None
    resume: bool
    overwrite: bool
    saved_step: int | None
    restartable: bool = False  # record in the run that restart_if_changed created it
    notes: list[str] = field(default_factory=list)  # said once the run is ours (lock held)

    @property
    def complete(self) -> bool:
        return self.saved_step is not None and self.saved_step == self.cfg.steps


def differences(saved: TrainConfig, wanted: TrainConfig, ignore: tuple[str, ...]) -> list[str]:
    """``key: saved -> wanted`` for every dotted key that differs, except the top-level keys
    in ``ignore``."""
    old, new = flatten(saved.to_dict()), flatten(wanted.to_dict())
    return [
        f"{k}: {old.get(k)!r} -> {v!r}"
        for k, v in new.items()
        if k.split(".")[0] not in ignore and old.get(k) != v
    ]


def _top_keys(diffs: list[str]) -> str:
    """``model, time`` from ``["model.channels: 8 -> 16", "time.ratio: ..."]``."""
    return ", ".join(dict.fromkeys(d.split(":")[0].split(".")[0] for d in diffs))


def _new_config(req: RunRequest, log: Callable[[str], None]):
    """Configuration of a new run; opens the data when it picks the preset or for a dry run,
    and returns it too when it was opened with the final configuration's data keys (else
    None), so that training need not open it again."""
    preset, data, probe = req.preset, None, None
    has_data = req.has_data or (preset in PRESETS and "data" in PRESETS[preset])
    if preset is None:
        check(
            req.has_data,
            "--data is required (a built-in name, an image dataset, a folder or a .npy/.npz path)",
        )
        probe = configure(TrainConfig(), None, req.settings)
        data = open_training_data(probe)
        preset = default_preset(data.kind, data.shape, probe.data)
        log(
            f"no --preset given; using {preset!r} for {data.kind} of shape "
            f"{'x'.join(map(str, data.shape))}"
        )
    cfg = configure(TrainConfig(), preset, req.settings)
    check(has_data or req.dry_run, f"--data is required (preset {preset!r} names no data)")
    if probe is not None and any(getattr(probe, k) != getattr(cfg, k) for k in _DATA_KEYS):
        data = None  # the preset reads other samples than the probe did
    if has_data and data is None and req.dry_run:
        data = open_training_data(cfg)
    elif data is not None:
        record_data(cfg, data)
    return cfg, data


def read_origin(out: str) -> dict:
    try:
        with open(os.path.join(out, ORIGIN_NAME)) as f:
            origin = json.load(f)
        return origin if isinstance(origin, dict) else {}
    except (OSError, ValueError):
        return {}


def _saved_config(out: str) -> TrainConfig | None:
    """The configuration a run directory records without a checkpoint (None: none readable)."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            return TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError, MeanFlowError):
        return None


def _may_restart(out: str, saved: TrainConfig, wanted: TrainConfig, step: int | None) -> str:
    """Why ``restart_if_changed`` may not start over the run in ``out`` ("" when it may)."""
    if not read_origin(out).get("restart_if_changed"):
        return "that --restart-if-changed did not create"
    if step is not None and step >= saved.steps:
        return f"that has finished ({plural(step, 'step')})"
    if saved.data != wanted.data:
        return f"of other data ({saved.data!r}, not {wanted.data!r})"
    return ""


def plan_run(req: RunRequest) -> RunPlan:
    """Decide what ``req`` does to its run directory (reads only; writes nothing). What it has
    to say is in ``plan.notes``, printed by :func:`run_plan` once the directory's lock is held
    (a job refused by the lock says nothing else)."""
    notes: list[str] = []
    log = notes.append
    if req.overwrite and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        log("torchrun restarted the workers; resuming instead of --overwrite")
        req.overwrite = False
    check(
        not (req.restart_if_changed and req.resume),
        "--restart-if-changed decides between resuming and starting over; drop --resume",
    )
    check(
        not (req.resume and req.overwrite),
        "--resume and --overwrite contradict each other; pick one",
    )
    if req.out is not None:
        refuse_file(req.out)
    existing = (
        req.out is not None
        and not req.overwrite
        and not req.dry_run
        and bool(list_checkpoints(os.path.join(req.out, "checkpoints")))
    )
    if req.resume:
        check(not req.dry_run, "--dry-run builds a new run; drop --resume")
        check(req.out is not None, "--resume needs --out RUN_DIR")
        assert req.out is not None
        _, _, meta = load_latest_good(req.out, tensors=False)
        cfg = TrainConfig.from_dict(meta["config"])
        changed = differences(cfg, configure(cfg, req.preset, req.settings), ("steps",))
        check(
            not changed,
            "--resume continues the saved configuration; these settings differ: "
            f"{'; '.join(changed)} (only --steps may change)",
        )
        plan = RunPlan(cfg, None, True, False, meta["step"])
    elif existing:
        assert req.out is not None
        _, _, meta = load_latest_good(req.out, tensors=False)
        saved = TrainConfig.from_dict(meta["config"])
        wanted, data = _new_config(req, log)
        changed = differences(saved, wanted, _DERIVED)
        if changed and req.restart_if_changed:
            refusal = _may_restart(req.out, saved, wanted, meta["step"])
            check(
                not refusal,
                f"run directory {req.out!r} holds a run {refusal} with other settings "
                f"({'; '.join(changed[:6])}); choose another --out, or pass --overwrite to "
                "replace it",
            )
            log(
                f"{req.out!r} holds a run with other settings ({_top_keys(changed)}); starting "
                f"over ({'; '.join(changed[:6])})"
            )
            plan = RunPlan(wanted, data, False, True, None, restartable=True)
        else:
            check(
                not changed,
                f"run directory {req.out!r} holds a run (step {meta['step']}) with other "
                f"settings ({'; '.join(changed[:6])}); rerun the command that started it to "
                "resume, pass --overwrite to replace it, or choose another --out",
            )
            plan = RunPlan(saved, data, True, False, meta["step"])
    else:
        cfg, data = _new_config(req, log)
        plan = RunPlan(cfg, data, False, req.overwrite, None, restartable=req.restart_if_changed)
        if req.out and not req.overwrite and not req.dry_run and os.path.isdir(req.out):
            _fresh_directory(req, plan)
    if req.steps is not None:
        plan.cfg.steps = req.steps
    plan.cfg.validate()
    _check_steps(req, plan, log)
    plan.notes = notes + plan.notes
    return plan


def _fresh_directory(req: RunRequest, plan: RunPlan) -> None:
    """A directory without checkpoints: a run killed before its first checkpoint may start
    again (same settings, or ``restart_if_changed`` on a run it created of the same data)."""
    assert req.out is not None
    saved = _saved_config(req.out)
    if saved is None:
        return  # nothing of a run here: train() refuses a non-empty directory
    changed = differences(saved, plan.cfg, _DERIVED)
    if not changed:
        plan.overwrite = True
        plan.notes.append(f"{req.out!r} holds this run without a checkpoint yet; starting it again")
    elif req.restart_if_changed:
        refusal = _may_restart(req.out, saved, plan.cfg, None)
        check(
            not refusal,
            f"run directory {req.out!r} holds a run {refusal} with other settings "
            f"({'; '.join(changed[:6])}); choose another --out, or pass --overwrite",
        )
        plan.overwrite = True


def _check_steps(req: RunRequest, plan: RunPlan, log: Callable[[str], None]) -> None:
    step = plan.saved_step
    if step is None:
        return
    check(
        step <= plan.cfg.steps,
        f"run {req.out!r} has already trained {plural(step, 'step')}, more than --steps "
        f"{plan.cfg.steps}; pass --steps {step} or more",
    )
    if step < plan.cfg.steps and not req.resume:
        log(
            f"{req.out!r} holds this run at step {step} of {plan.cfg.steps}; resuming (pass "
            "--overwrite to start over)"
        )


def fit(
    out: str | None = None,
    *,
    data: str | None = None,
    preset: str | None = None,
    steps: int | None = None,
    settings: dict[str, Any] | Settings = (),
    resume: bool = False,
    overwrite: bool = False,
    restart_if_changed: bool = False,
    device: torch.device | str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Train into run directory ``out`` as ``meanflow train`` does, with the same policy
    (module docstring), and return what the run reached. ``settings`` are ``--set`` keys
    (``{"optim.lr": 3e-4}``); a user error raises :class:`MeanFlowError`."""
    pairs = list(settings.items()) if isinstance(settings, dict) else list(settings)
    req = RunRequest(
        out,
        ([("data", data)] if data is not None else []) + pairs,
        preset,
        steps,
        resume,
        overwrite,
        restart_if_changed,
    )
    check(out is not None, "--out RUN_DIR is required (or pass --dry-run)")
    return run_plan(req, plan_run(req), resolve_device(str(device)), progress, log)


def run_plan(
    req: RunRequest,
    plan: RunPlan,
    device: torch.device,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Carry out ``plan`` under the run directory's lock: train, or for a complete run redraw
    its pictures."""
    assert req.out is not None
    out, main = req.out, distributed.from_env().is_main
    created = not os.path.exists(out)
    with hold_lock(out):
        if main:
            for note in plan.notes:
                log(note)
        if plan.complete:
            return complete_run(out, plan, device, log)
        origin = os.path.join(out, ORIGIN_NAME)
        before = _read_text(origin)
        if not plan.resume and main:
            check_run_dir(out, plan.overwrite)  # before the note below is written
            with open(origin, "w") as f:
                json.dump({"restart_if_changed": plan.restartable, "data": plan.cfg.data}, f)
        try:
            return train(
                plan.cfg,
                out,
                resume=plan.resume,
                overwrite=plan.overwrite,
                device=device,
                progress=progress,
                data=plan.data,
            )
        except BaseException:
            if main and not plan.resume and not os.path.exists(os.path.join(out, "config.json")):
                _undo(out, origin, before, created)  # refused before it began: leave no trace
            raise


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _undo(out: str, origin: str, before: str | None, created: bool) -> None:
    """Put back what :func:`run_plan` changed in ``out`` for a run that never started: the
    previous ``origin.json`` (or none), and a directory it created (with its lock file)."""
    if before is None:
        with contextlib.suppress(OSError):
            os.remove(origin)
    else:
        with open(origin, "w") as f:
            f.write(before)
    if created:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, LOCK_NAME))
            os.rmdir(out)


def complete_run(
    out: str, plan: RunPlan, device: torch.device, log: Callable[[str], None] = _stderr
) -> TrainResult:
    """A rerun of a finished run: nothing to train. Redraw ``loss.png``, write the one-step
    preview if an interruption after the last checkpoint left it missing, and report."""
    cfg = plan.cfg
    log(
        f"{out!r} is complete ({cfg.steps} of {plural(cfg.steps, 'step')}); nothing to train "
        "(pass a larger --steps to continue, or --overwrite to start over)"
    )
    write_loss_curve(out, f"{cfg.objective} on {cfg.data}")
    preview = os.path.join(out, "samples-1step.png")
    if not os.path.isfile(preview):
        run = load_run(out, "ema", device)
        reference = None
        if not run.is_image:
            data = open_training_data(cfg) if plan.data is None else plan.data
            assert data.x is not None  # vectors are held in memory
            reference = data.x[: cfg.sample_num].numpy()
        write_preview(preview, run, device, reference, cfg.seed)
    last = last_metrics(out)
    loss = float(last.get("loss", float("nan")))
    return TrainResult(out, cfg.steps, loss, 0.0, int(last.get("skipped", 0)), complete=True)
