"""``meanflow train``: its options, how the command line becomes a :class:`TrainConfig`
(presets, flags, ``--set``; resuming by ``--resume`` or by rerunning the same command), and
``--dry-run``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from ..config.overrides import parse_overrides
from ..config.presets import PRESETS
from ..config.schema import OBJECTIVES, config_keys
from ..errors import check
from ..runtime.devices import resolve_device
from ..runtime.distributed import from_env
from ..train.dry_run import describe
from ..train.rundir import RunRequest, plan_run, run_plan

TRAIN_EPILOG = """\
examples:
  meanflow train --data checkerboard --out runs/checker
  meanflow train --data my_points.npy --out runs/mine --steps 20000 --set time.ratio=0.5
  meanflow train --out runs/checker --resume --steps 8000
  meanflow train --data checkerboard --init runs/checker-fm --out runs/checker-ft
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
        "vectors, vectors for other dimensions, fashion-mnist-small, "
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
        "--init",
        metavar="RUN_DIR",
        help="start the network from RUN_DIR's EMA weights (same model settings): step 0, a "
        "fresh optimizer; e.g. fine-tune a flow-matching run into MeanFlow",
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
        help="resume RUN_DIR when it holds this run (same settings); start it over "
        "when it holds an unfinished run of the same data that this flag created, with other "
        "settings; refuse anything else (for scripts such as the demo)",
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


def train_request(args) -> RunRequest:
    """The :class:`RunRequest` of ``meanflow train``'s options: flags and ``--set`` as dotted
    settings, in command-line precedence."""
    flags = [
        (k, v)
        for k, v in (
            ("data", args.data),
            ("data_dir", args.data_dir),
            ("image_size", args.image_size),
            ("objective", args.objective),
            ("batch_size", args.batch_size),
            ("seed", args.seed),
            ("init", args.init),
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
    return RunRequest(
        args.out,
        flags + parse_overrides(args.set),
        preset=args.preset,
        steps=args.steps,
        resume=args.resume,
        overwrite=args.overwrite,
        restart_if_changed=args.restart_if_changed,
        dry_run=args.dry_run,
    )


def cmd_train(args) -> int:
    req = train_request(args)
    plan = plan_run(req)
    if args.dry_run:
        for note in plan.notes:
            print(f"meanflow: {note}", file=sys.stderr)
        print(json.dumps(describe(plan.cfg, plan.data)))
        return 0
    check(args.out is not None, "--out RUN_DIR is required (or pass --dry-run)")
    device = resolve_device(args.device)
    choice = getattr(args, "thread_choice", None)
    if choice is not None and not args.quiet and device.type == "cpu" and from_env().is_main:
        hint = "" if choice.reason == "as requested" else "; --threads N to choose"
        print(
            f"meanflow: {choice.threads} CPU thread{'s' * (choice.threads != 1)} "
            f"({choice.reason}{hint})",
            file=sys.stderr,
        )
    result = run_plan(req, plan, device, progress=not args.quiet)
    if result.stopped_by is not None:
        print(
            f"meanflow: stopped by {result.stopped_by} after step {result.step}; the checkpoint "
            "is saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + int(getattr(signal, result.stopped_by))
    if not from_env().is_main:
        return 0
    report = {
        "run": result.run_dir,
        "step": result.step,
        "loss": result.final_loss,
        "seconds": round(result.seconds, 2),
        "skipped_steps": result.skipped_steps,
    }
    if result.complete:
        report["complete"] = True
    report["samples_png"] = os.path.join(result.run_dir, "samples-1step.png")
    print(json.dumps(report))
    return 0
