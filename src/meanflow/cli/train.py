"""``meanflow train``: its options, how the command line becomes a :class:`TrainConfig`
(presets, flags, ``--set``; resuming by ``--resume`` or by rerunning the same command), and
``--dry-run``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from ..errors import MeanFlowError, check, plural
from ..train.config import OBJECTIVES, config_keys
from ..train.presets import PRESETS, PUBLISHED

TRAIN_EPILOG = """\
examples:
  meanflow train --data checkerboard --out runs/checker
  meanflow train --data my_points.npy --out runs/mine --steps 20000 --set time.ratio=0.5
  meanflow train --out runs/checker --resume --steps 8000
  meanflow train --data fashion-mnist --out runs/fmnist          # preset fashion-mnist-small
  meanflow train --data my_images/ --image-size 32 --out runs/mine --hflip
  meanflow train --preset imagenet256-xl2 --dry-run               # build, count, exit

config keys for --set (see docs/configuration.md for meanings and defaults):
  {keys}
presets: {presets}
"""


def add_train_parser(sub) -> None:

    p = sub.add_parser(
        "train",
        help="train a MeanFlow (or flow-matching) model",
        description="Train a model and write a run directory: config.json, metrics.jsonl, "
        "checkpoints/ (safetensors + JSON), samples-1step.png (a scatter plot, or "
        "an image grid), loss.png, and for images samples/step-N.png grids.",
        epilog=TRAIN_EPILOG.format(keys="\n  ".join(config_keys()), presets=", ".join(PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        metavar="NAME_OR_PATH",
        help="built-in 2-D distribution (checkerboard, eight-gaussians, two-moons, "
        "rings), image dataset (fashion-mnist, digits, cifar10), a folder of "
        "PNG/JPEG images (one sub-folder per class for labels), or a .npy/.npz "
        "file of (N, D) vectors or (N, C, H, W) arrays (labels as y in .npz)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with the fashion-mnist IDX files (default: where the Debian "
        "package dataset-fashion-mnist puts them) or the cifar10 binary batches",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        help="resize folder images to S x S (digits: 8, 16 or 32)",
    )
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="ignore the data's labels (labelled data trains class-conditional)",
    )
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of images")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to write (not with --dry-run)")
    p.add_argument(
        "--preset",
        help="named settings (default from the data: toy-2d for 2-D "
        "vectors, mlp for other vectors, fashion-mnist-small, "
        "digits-small, unet-small for other images)",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        help="training objective (default meanflow; flow-matching is the r = t "
        "baseline; imf: improved MeanFlow; alphaflow: AlphaFlow's curriculum)",
    )
    p.add_argument("--steps", type=int, metavar="N", help="total optimizer steps to train for")
    p.add_argument("--batch-size", type=int, metavar="B", help="samples per step")
    p.add_argument("--seed", type=int, metavar="S", help="seed for init, data order, noise, times")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set time.ratio=0.5",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest checkpoint in RUN_DIR (only --steps may change)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files in an existing RUN_DIR instead of refusing",
    )
    p.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="resume RUN_DIR when it holds this run (same settings), start it over "
        "when it holds a run with other settings (for scripts such as the demo)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to RUN_DIR/tensorboard (needs `pip install tensorboard`)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model and optimizer (and open --data if given), print one "
        "JSON line with the preset and parameter count, and exit",
    )


def _train_settings(args) -> list:
    """The dotted settings given by flags and ``--set``, in command-line precedence."""
    from ..train.config import parse_overrides

    flags = [
        (k, v)
        for k, v in (
            ("data", args.data),
            ("data_dir", args.data_dir),
            ("image_size", args.image_size),
            ("objective", args.objective),
            ("batch_size", args.batch_size),
            ("seed", args.seed),
        )
        if v is not None
    ]
    flags += [
        (key, value)
        for key, value, on in (
            ("conditional", False, args.unconditional),
            ("hflip", True, args.hflip),
            ("tensorboard", True, args.tensorboard),
        )
        if on
    ]
    return flags + parse_overrides(args.set)


# keys that decide which samples open_training_data reads
_DATA_KEYS = ("data", "data_dir", "image_size", "num_data", "seed", "stream")


def _new_config(args, settings):
    """Configuration of a new run; opens the data when it picks the preset or for --dry-run,
    and returns it too when it was opened with the final configuration's data keys (else
    None), so that training need not open it again."""
    from ..train.batches import open_training_data, record_data
    from ..train.config import TrainConfig
    from ..train.presets import PRESETS, configure, default_preset

    preset, data = args.preset, None
    has_data = args.data is not None or (preset in PRESETS and "data" in PRESETS[preset])
    if preset is None:
        check(
            args.data is not None,
            "--data is required (a built-in name, an image dataset, a folder or a .npy/.npz path)",
        )
        probe = configure(TrainConfig(), None, settings)
        data = open_training_data(probe)
        preset = default_preset(data.kind, data.shape, probe.data)
        print(
            f"meanflow: no --preset given; using {preset!r} for {data.kind} of shape "
            f"{'x'.join(map(str, data.shape))}",
            file=sys.stderr,
        )
    cfg = configure(TrainConfig(), preset, settings)
    check(has_data or args.dry_run, f"--data is required (preset {preset!r} names no data)")
    if data is not None and any(getattr(probe, k) != getattr(cfg, k) for k in _DATA_KEYS):
        data = None  # the preset reads other samples than the probe did
    if has_data and data is None and args.dry_run:
        data = open_training_data(cfg)
    elif data is not None:
        record_data(cfg, data)
    return cfg, data


# keys filled in from the data, not chosen by the user
_DERIVED = ("steps", "data_shape", "num_classes")


def _differing(saved, wanted, ignore: tuple[str, ...]) -> list[str]:
    """Top-level config keys whose values differ between two configs, except ``ignore``."""
    saved, wanted = saved.to_dict(), wanted.to_dict()
    return [k for k, v in wanted.items() if k not in ignore and saved[k] != v]


def _train_config(args):
    """``(cfg, data, resume)`` for ``meanflow train``. ``--resume`` continues the newest good
    checkpoint; rerunning the command of an existing run continues it too (edm2-style) when the
    settings match, and is refused with the differing keys otherwise."""
    from ..train.checkpoint import list_checkpoints, load_latest_good
    from ..train.config import TrainConfig
    from ..train.presets import configure

    settings = _train_settings(args)
    if args.overwrite and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        print(
            "meanflow: torchrun restarted the workers; resuming instead of --overwrite",
            file=sys.stderr,
        )
        args.overwrite = False
    existing = (
        args.out is not None
        and not args.overwrite
        and not args.dry_run
        and bool(list_checkpoints(os.path.join(args.out, "checkpoints")))
    )
    data, resume, overwrite, saved_step = None, args.resume, args.overwrite, None
    check(
        not (args.restart_if_changed and (args.resume or args.overwrite)),
        "--restart-if-changed decides between resuming and starting over; drop --resume "
        "and --overwrite",
    )
    if args.resume:
        check(not args.overwrite, "--resume and --overwrite contradict each other; pick one")
        check(not args.dry_run, "--dry-run builds a new run; drop --resume")
        check(args.out is not None, "--resume needs --out RUN_DIR")
        _, _, meta = load_latest_good(args.out, tensors=False)
        cfg = TrainConfig.from_dict(meta["config"])
        changed = _differing(cfg, configure(cfg, args.preset, settings), ("steps",))
        check(
            not changed,
            f"--resume continues the saved configuration; these settings differ: "
            f"{', '.join(changed)} (only --steps may change)",
        )
        saved_step = meta["step"]
    elif existing:
        _, _, meta = load_latest_good(args.out, tensors=False)
        cfg = TrainConfig.from_dict(meta["config"])
        wanted, data = _new_config(args, settings)
        changed = _differing(cfg, wanted, _DERIVED)
        if changed and args.restart_if_changed:
            print(
                f"meanflow: {args.out!r} holds a run with other settings "
                f"({', '.join(changed[:4])}); starting over",
                file=sys.stderr,
            )
            cfg, overwrite = wanted, True
        else:
            check(
                not changed,
                f"run directory {args.out!r} holds a run (step {meta['step']}) "
                f"with other settings ({', '.join(changed[:4])}); rerun the command that "
                "started it to resume, pass --overwrite to replace it, or choose another --out",
            )
            resume, saved_step = True, meta["step"]
    else:
        cfg, data = _new_config(args, settings)
        restart = _unstarted_same_run(args, cfg)
        if restart:
            print(
                f"meanflow: {args.out!r} holds this run without a checkpoint yet; starting it "
                "again",
                file=sys.stderr,
            )
        overwrite = args.overwrite or restart or args.restart_if_changed
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.validate()
    if saved_step is not None:
        check(
            saved_step <= cfg.steps,
            f"run {args.out!r} has already trained "
            f"{plural(saved_step, 'step')}, more than --steps {cfg.steps}; pass --steps "
            f"{saved_step} or more",
        )
        if saved_step < cfg.steps and not args.resume:
            print(
                f"meanflow: {args.out!r} holds this run at step {saved_step} of {cfg.steps}; "
                "resuming (pass --overwrite to start over)",
                file=sys.stderr,
            )
    return cfg, data, resume, overwrite, saved_step


def _unstarted_same_run(args, cfg) -> bool:
    """True when ``--out`` holds only the config (and metrics) of this very run, killed before
    its first checkpoint: rerunning the command may then start it again."""
    from ..train.config import TrainConfig

    path = os.path.join(args.out or "", "config.json")
    if args.dry_run or args.overwrite or not args.out or not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            saved = TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError, MeanFlowError):
        return False
    return not _differing(saved, cfg, _DERIVED)


def cmd_train(args) -> int:
    from ..train.factory import resolve_device
    from ..train.loop import train

    cfg, data, resume, overwrite, saved_step = _train_config(args)
    if args.dry_run:
        return _dry_run(cfg, data)
    check(args.out is not None, "--out RUN_DIR is required (or pass --dry-run)")
    if saved_step is not None and saved_step == cfg.steps:
        return _complete(args, cfg, data)
    from ..distributed import from_env

    choice = getattr(args, "thread_choice", None)
    if (
        choice is not None
        and not args.quiet
        and resolve_device(args.device).type == "cpu"
        and from_env().is_main
    ):
        hint = "" if choice.reason == "as requested" else "; --threads N to choose"
        print(
            f"meanflow: {choice.threads} CPU thread{'s' * (choice.threads != 1)} "
            f"({choice.reason}{hint})",
            file=sys.stderr,
        )
    result = train(
        cfg,
        args.out,
        resume=resume,
        overwrite=overwrite,
        device=resolve_device(args.device),
        progress=not args.quiet,
        data=data,
    )
    if result.stopped_by is not None:
        print(
            f"meanflow: stopped by {result.stopped_by} after step {result.step}; the checkpoint "
            "is saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + int(getattr(signal, result.stopped_by))
    if not from_env().is_main:
        return 0
    print(
        json.dumps(
            {
                "run": result.run_dir,
                "step": result.step,
                "loss": result.final_loss,
                "seconds": round(result.seconds, 2),
                "skipped_steps": result.skipped_steps,
                "samples_png": os.path.join(result.run_dir, "samples-1step.png"),
            }
        )
    )
    return 0


def _complete(args, cfg, data) -> int:
    """A rerun of a finished run: nothing to train. Redraw ``loss.png``, write the one-step
    preview if an interruption after the last checkpoint left it missing, and report."""
    from ..train.batches import open_training_data
    from ..train.factory import resolve_device
    from ..train.pictures import write_loss_curve, write_preview
    from ..train.reliability import last_metrics
    from ..train.run import load_run

    print(
        f"meanflow: {args.out!r} is complete ({cfg.steps} of {plural(cfg.steps, 'step')}); "
        "nothing to train (pass a larger --steps to continue, or --overwrite to start over)",
        file=sys.stderr,
    )
    write_loss_curve(args.out, f"{cfg.objective} on {cfg.data}")
    preview = os.path.join(args.out, "samples-1step.png")
    if not os.path.isfile(preview):
        device = resolve_device(args.device)
        run = load_run(args.out, "ema", device)
        reference = None
        if not run.is_image:
            data = open_training_data(cfg) if data is None else data
            reference = data.x[: cfg.sample_num].numpy()
        write_preview(preview, run, device, reference, cfg.seed)
    last = last_metrics(args.out)
    print(
        json.dumps(
            {
                "run": args.out,
                "step": cfg.steps,
                "loss": last.get("loss"),
                "seconds": 0.0,
                "skipped_steps": last.get("skipped", 0),
                "complete": True,
                "samples_png": preview,
            }
        )
    )
    return 0


def _dry_run(cfg, data) -> int:
    """Build the network, objective and optimizer of ``cfg`` and print what they are."""
    import torch

    from ..train.factory import build_model, build_objective, build_optimizer, count_parameters

    check(
        bool(cfg.shape),
        f"preset {cfg.preset!r} does not say the data shape; pass --data "
        "or --set data_shape=CxHxW (or D)",
    )
    classes = cfg.num_classes if cfg.conditional else 0
    with torch.device("meta"):  # no memory: shapes only
        model = build_model(cfg, cfg.shape, classes)
    objective = build_objective(cfg, classes)
    build_optimizer(cfg, model)
    g = cfg.guidance
    guidance = {
        "omega": g.omega,
        "kappa": g.kappa,
        "interval": [g.t_min, g.t_max],
        "effective_scale": g.omega / (1 - g.kappa) if g.kappa < 1 else None,
        "label_dropout": g.label_dropout,
    }
    published = PUBLISHED.get(cfg.preset)
    print(
        json.dumps(
            {
                "preset": cfg.preset,
                "parameters": count_parameters(model),
                "model": type(model).__name__,
                "arch": cfg.model.arch,
                "size": cfg.model.size,
                "data_shape": list(cfg.shape),
                "num_classes": classes,
                "objective": type(objective).__name__,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "data": cfg.data if data is not None else None,
                "data_samples": len(data) if data is not None else None,
                "guidance": guidance if classes else None,
                "hflip": cfg.hflip,
                "precision": cfg.precision,
                "reproduces": vars(published) if published else None,
            }
        )
    )
    return 0
