"""The ``meanflow`` command: ``train``, ``sample`` and ``eval``.

Every user error is printed as one line ``meanflow: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

from .errors import MeanFlowError, check

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


def _train_parser(sub) -> None:
    from .train.config import config_keys
    from .train.presets import PRESETS

    p = sub.add_parser(
        "train", help="train a MeanFlow (or flow-matching) model",
        description="Train a model and write a run directory: config.json, metrics.jsonl, "
                    "checkpoints/ (safetensors + JSON), samples-1step.png (a scatter plot, or "
                    "an image grid), loss.png, and for images samples/step-N.png grids.",
        epilog=TRAIN_EPILOG.format(keys="\n  ".join(config_keys()), presets=", ".join(PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="NAME_OR_PATH",
                   help="built-in 2-D distribution (checkerboard, eight-gaussians, two-moons, "
                        "rings), image dataset (fashion-mnist, digits, cifar10), a folder of "
                        "PNG/JPEG images (one sub-folder per class for labels), or a .npy/.npz "
                        "file of (N, D) vectors or (N, C, H, W) arrays (labels as y in .npz)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the fashion-mnist IDX files (default: where the Debian "
                        "package dataset-fashion-mnist puts them) or the cifar10 binary batches")
    p.add_argument("--image-size", type=int, metavar="S",
                   help="resize folder images to S x S (digits: 8, 16 or 32)")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels (labelled data trains class-conditional)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of images")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to write (not with --dry-run)")
    p.add_argument("--preset", help="named settings (default from the data: toy-2d for 2-D "
                                    "vectors, mlp for other vectors, fashion-mnist-small, "
                                    "digits-small, unet-small for other images)")
    p.add_argument("--objective", choices=["meanflow", "flow-matching"],
                   help="training objective (default meanflow; flow-matching is the r = t baseline)")
    p.add_argument("--steps", type=int, metavar="N", help="total optimizer steps to train for")
    p.add_argument("--batch-size", type=int, metavar="B", help="samples per step")
    p.add_argument("--seed", type=int, metavar="S", help="seed for init, data order, noise, times")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set time.ratio=0.5")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint in RUN_DIR (only --steps may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run files in an existing RUN_DIR instead of refusing")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to RUN_DIR/tensorboard (needs `pip install tensorboard`)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model and optimizer (and open --data if given), print one "
                        "JSON line with the preset and parameter count, and exit")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run with z_r = z_t - (t - r) u(z_t, r, t); "
                                   "writes .npy (N, ...) float32 in data units; .png: a scatter "
                                   "plot of vectors or a grid of images; .npz (images): uint8 "
                                   "(N, H, W, C) as arr_0 and labels as arr_1 (ADM layout).")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory from train")
    p.add_argument("--num", type=int, required=True, metavar="N", help="number of samples")
    p.add_argument("--steps", type=int, default=1, metavar="K",
                   help="uniform sampling steps from t=1 to t=0 (default 1: one evaluation)")
    p.add_argument("--schedule", metavar="T0,T1,...",
                   help="explicit decreasing times, e.g. 1,0.6,0 (overrides --steps)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--class", dest="classes", metavar="LABELS",
                   help="class-conditional runs: one label, a comma list (cycled), 'random', "
                        "'none' (the null label: unguided, unconditional), class names allowed "
                        "(default: cycle through all classes)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy, .png or .npz")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _eval_parser(sub) -> None:
    from .eval import DEFAULT_PROJECTIONS

    p = sub.add_parser("eval", help="compare samples with reference data (SWD, energy distance)",
                       description="Sample a run and print one JSON line with the sliced "
                                   f"Wasserstein-2 distance ({DEFAULT_PROJECTIONS} projections "
                                   "by default) and the energy distance to a reference set.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory from train")
    p.add_argument("--reference", required=True, metavar="NAME_OR_PATH",
                   help="built-in distribution (fresh draws, independent of the training set), "
                        "a .npy/.npz file of reference points, or for image runs an image "
                        "dataset or folder (fashion-mnist and cifar10: their test split)")
    p.add_argument("--steps", type=int, default=1, metavar="K", help="sampling steps (default 1)")
    p.add_argument("--num", type=int, default=5000, metavar="N",
                   help="samples drawn, and reference points drawn for a built-in (default 5000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument("--projections", type=int, default=DEFAULT_PROJECTIONS, metavar="P",
                   help=f"random projections for SWD (default {DEFAULT_PROJECTIONS})")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


class Parser(argparse.ArgumentParser):
    """argparse with our error format: one line ``meanflow: error: ...`` (exit 2), naming the
    closest valid option for a misspelled one."""

    options: set[str] = set()

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments"):
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], sorted(Parser.options), n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"meanflow: error: {self.prog}: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="meanflow", description="Train and sample one-step generative models with MeanFlow "
        "(Geng et al. 2025). Conventions: t=0 data, t=1 noise; one step is x = e - u(e, 0, 1).")
    parser.add_argument("--version", action="version", version=f"meanflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    Parser.options = {o for p in sub.choices.values() for a in p._actions
                      for o in a.option_strings if o.startswith("--")}
    return parser


def _train_settings(args) -> list:
    """The dotted settings given by flags and ``--set``, in command-line precedence."""
    from .train.config import parse_overrides

    flags = [(k, v) for k, v in (("data", args.data), ("data_dir", args.data_dir),
                                 ("image_size", args.image_size), ("objective", args.objective),
                                 ("batch_size", args.batch_size), ("seed", args.seed))
             if v is not None]
    flags += [(key, value) for key, value, on in (("conditional", False, args.unconditional),
                                                  ("hflip", True, args.hflip),
                                                  ("tensorboard", True, args.tensorboard)) if on]
    return flags + parse_overrides(args.set)


def _new_config(args, settings):
    """Configuration of a new run; opens the data when it picks the preset or for --dry-run
    (returns it too, or None)."""
    from .train.batches import open_training_data, record_data
    from .train.config import TrainConfig
    from .train.presets import PRESETS, configure, default_preset

    preset, data = args.preset, None
    has_data = args.data is not None or (preset in PRESETS and "data" in PRESETS[preset])
    if preset is None:
        check(args.data is not None, "--data is required (a built-in name, an image "
              "dataset, a folder or a .npy/.npz path)")
        probe = configure(TrainConfig(), None, settings)
        data = open_training_data(probe)
        preset = default_preset(data.kind, data.shape, probe.data)
        print(f"meanflow: no --preset given; using {preset!r} for {data.kind} of shape "
              f"{'x'.join(map(str, data.shape))}", file=sys.stderr)
    cfg = configure(TrainConfig(), preset, settings)
    check(has_data or args.dry_run, f"--data is required (preset {preset!r} names no data)")
    if has_data and data is None and args.dry_run:
        data = open_training_data(cfg)
    elif data is not None:
        record_data(cfg, data)
    return cfg, data


# keys filled in from the data, not chosen by the user
_DERIVED = ("steps", "data_shape", "num_classes")


def _train_config(args):
    """``(cfg, data, resume)`` for ``meanflow train``. ``--resume`` continues the newest good
    checkpoint; rerunning the command of an existing run continues it too (edm2-style) when the
    settings match, and is refused with the differing keys otherwise."""
    from .train.checkpoint import list_checkpoints, load_latest_good
    from .train.config import TrainConfig
    from .train.presets import configure

    settings = _train_settings(args)
    existing = (args.out is not None and not args.overwrite and not args.dry_run
                and bool(list_checkpoints(os.path.join(args.out, "checkpoints"))))
    data, resume, overwrite = None, args.resume, args.overwrite
    if args.resume:
        check(not args.overwrite, "--resume and --overwrite contradict each other; pick one")
        check(not args.dry_run, "--dry-run builds a new run; drop --resume")
        check(args.out is not None, "--resume needs --out RUN_DIR")
        _, _, meta = load_latest_good(args.out)
        cfg = TrainConfig.from_dict(meta["config"])
        saved = cfg.to_dict()
        requested = configure(cfg, args.preset, settings).to_dict()
        changed = [k for k, v in requested.items() if k != "steps" and saved[k] != v]
        check(not changed, f"--resume continues the saved configuration; these settings differ: "
              f"{', '.join(changed)} (only --steps may change)")
    elif existing:
        _, _, meta = load_latest_good(args.out)
        cfg = TrainConfig.from_dict(meta["config"])
        requested, data = _new_config(args, settings)
        saved, wanted = cfg.to_dict(), requested.to_dict()
        changed = [k for k, v in wanted.items() if k not in _DERIVED and saved[k] != v]
        check(not changed, f"run directory {args.out!r} holds a run (step {meta['step']}) with "
              f"other settings ({', '.join(changed[:4])}); rerun the command that started it to "
              "resume, pass --overwrite to replace it, or choose another --out")
        print(f"meanflow: {args.out!r} holds this run at step {meta['step']}; resuming (pass "
              "--overwrite to start over)", file=sys.stderr)
        resume, data = True, None
    else:
        cfg, data = _new_config(args, settings)
        restart = _unstarted_same_run(args, cfg)
        if restart:
            print(f"meanflow: {args.out!r} holds this run without a checkpoint yet; starting it "
                  "again", file=sys.stderr)
        overwrite = args.overwrite or restart
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.validate()
    return cfg, data, resume, overwrite


def _unstarted_same_run(args, cfg) -> bool:
    """True when ``--out`` holds only the config (and metrics) of this very run, killed before
    its first checkpoint: rerunning the command may then start it again."""
    from .train.config import TrainConfig

    path = os.path.join(args.out or "", "config.json")
    if args.dry_run or not args.out or not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            saved = TrainConfig.from_dict(json.load(f)).to_dict()
    except (OSError, ValueError, MeanFlowError):
        return False
    wanted = cfg.to_dict()
    return all(saved[k] == v for k, v in wanted.items() if k not in _DERIVED)


def cmd_train(args) -> int:
    from .train import train
    from .train.factory import resolve_device

    cfg, data, resume, overwrite = _train_config(args)
    if args.dry_run:
        return _dry_run(cfg, data)
    check(args.out is not None, "--out RUN_DIR is required (or pass --dry-run)")
    result = train(cfg, args.out, resume=resume, overwrite=overwrite,
                   device=resolve_device(args.device), progress=not args.quiet)
    if result.stopped_by is not None:
        print(f"meanflow: stopped by {result.stopped_by} after step {result.step}; the checkpoint "
              "is saved; rerun the same command to resume", file=sys.stderr)
        return 128 + int(getattr(signal, result.stopped_by))
    print(json.dumps({"run": result.run_dir, "step": result.step, "loss": result.final_loss,
                      "seconds": round(result.seconds, 2), "skipped_steps": result.skipped_steps,
                      "samples_png": os.path.join(result.run_dir, "samples-1step.png")}))
    return 0


def _dry_run(cfg, data) -> int:
    """Build the network, objective and optimizer of ``cfg`` and print what they are."""
    import torch

    from .train.factory import build_model, build_objective, build_optimizer, count_parameters

    check(bool(cfg.shape), f"preset {cfg.preset!r} does not say the data shape; pass --data "
          "or --set data_shape=CxHxW (or D)")
    classes = cfg.num_classes if cfg.conditional else 0
    with torch.device("meta"):  # no memory: shapes only
        model = build_model(cfg, cfg.shape, classes)
    objective = build_objective(cfg, classes)
    build_optimizer(cfg, model)
    print(json.dumps({
        "preset": cfg.preset, "parameters": count_parameters(model),
        "model": type(model).__name__, "arch": cfg.model.arch, "size": cfg.model.size,
        "data_shape": list(cfg.shape), "num_classes": classes,
        "objective": type(objective).__name__, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "data": cfg.data if data is not None else None,
        "data_samples": len(data) if data is not None else None}))
    return 0


def _schedule(text):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MeanFlowError(f"--schedule expects comma-separated numbers, got {text!r}") from None


def parse_classes(text: str | None, num: int, run, seed: int):
    """Labels (num,) for ``--class`` (see its help), or None for the null label / unlabelled."""
    import torch

    k = run.num_classes
    if k == 0:
        check(text is None, "--class needs a class-conditional run; this run is unconditional")
        return None
    if text is None:
        return torch.arange(num) % k
    if text.strip().lower() == "none":
        return None
    if text.strip().lower() == "random":
        return torch.randint(0, k, (num,), generator=torch.Generator().manual_seed(seed + 1))
    names = run.class_names or [str(i) for i in range(k)]
    labels = []
    for item in (v.strip() for v in text.split(",")):
        if item.isdigit() and int(item) < k:
            labels.append(int(item))
        elif item in names:
            labels.append(names.index(item))
        else:
            raise MeanFlowError(f"--class {item!r} is not a class of this run; use 0..{k - 1}"
                                f", one of {', '.join(names[:10])}{', ...' if k > 10 else ''}"
                                ", 'random' or 'none'")
    return torch.tensor(labels)[torch.arange(num) % len(labels)]


def cmd_sample(args) -> int:
    from .plotting import image_grid_png, scatter_png, to_uint8
    from .train import load_run
    from .train.factory import resolve_device
    from .train.run import grid_columns

    ext = os.path.splitext(args.out)[1].lower()
    check(ext in (".npy", ".png", ".npz"), f"--out must end in .npy, .png or .npz, got "
          f"{args.out!r}")
    check(not os.path.isdir(args.out), f"--out {args.out!r} is a directory; give a file name")
    check(args.overwrite or not os.path.exists(args.out),
          f"{args.out!r} already exists; pass --overwrite to replace it or choose another name")
    device = resolve_device(args.device)
    run = load_run(args.run, "raw" if args.raw else "ema", device)
    check(ext != ".npz" or run.is_image, ".npz output holds uint8 images; this run samples "
          "vectors, use .npy")
    labels = parse_classes(args.classes, args.num, run, args.seed)
    points = run.sample(args.num, steps=args.steps, seed=args.seed,
                        schedule=_schedule(args.schedule), device=device, labels=labels)
    tmp = args.out + ".tmp" + ext
    if ext == ".npy":
        np.save(tmp, points)
    elif ext == ".npz":
        arrays = {"arr_0": to_uint8(points)}
        if labels is not None:
            arrays["arr_1"] = labels.numpy().astype(np.int64)
        np.savez(tmp, **arrays)
    elif run.is_image:
        ncol = grid_columns(args.num, run.num_classes if labels is not None else 0)
        image_grid_png(tmp, points, ncol, scale=max(1, 64 // run.shape[1]))
    else:
        label = args.schedule or f"{args.steps} step{'s' if args.steps > 1 else ''}"
        scatter_png(tmp, [(f"{run.config.objective}, {label} ({run.weights})", points)])
    os.replace(tmp, args.out)
    print(json.dumps({"out": args.out, "num": args.num, "steps": args.steps,
                      "schedule": _schedule(args.schedule), "weights": run.weights,
                      "classes": None if labels is None else sorted(set(labels.tolist())),
                      "checkpoint_step": run.step}))
    return 0


def cmd_eval(args) -> int:
    from .data import TOY_DATASETS, load_vectors
    from .eval import energy_distance, sliced_wasserstein
    from .train import load_run
    from .train.factory import resolve_device

    check(args.num >= 2, f"--num must be >= 2, got {args.num}")
    check(args.projections >= 1, f"--projections must be >= 1, got {args.projections}")
    device = resolve_device(args.device)
    run = load_run(args.run, "raw" if args.raw else "ema", device)
    labels = None
    if run.is_image:
        reference = _image_reference(args.reference, run)
        labels = parse_classes(None, args.num, run, args.seed)
    elif args.reference in TOY_DATASETS:
        reference = load_vectors(args.reference, num=args.num, seed=10_000 + args.seed)
    else:
        reference = load_vectors(args.reference)
    samples = run.sample(args.num, steps=args.steps, seed=args.seed, device=device,
                         labels=labels).reshape(args.num, -1)
    check(reference.shape[1] == samples.shape[1], f"the reference has {reference.shape[1]} "
          f"dimensions but the run samples {samples.shape[1]}; compare with data of the same "
          "shape")
    print(json.dumps({
        "swd": sliced_wasserstein(samples, reference, projections=args.projections),
        "energy_distance": energy_distance(samples, reference),
        "steps": args.steps, "num": args.num, "reference": args.reference,
        "reference_num": int(reference.shape[0]), "projections": args.projections,
        "weights": run.weights, "seed": args.seed, "checkpoint_step": run.step}))
    return 0


def _image_reference(name: str, run) -> np.ndarray:
    """Reference images for an image run, flattened to (N, C*H*W) in the run's units."""
    from .data import check_same_classes, open_data

    cfg = run.config
    same = name == cfg.data
    split = "test" if name in ("fashion-mnist", "cifar10") else "train"
    ref = open_data(name, directory=cfg.data_dir if same else "", size=cfg.image_size,
                    split=split)
    check(ref.shape == run.shape, f"reference {name!r} holds samples of shape {ref.shape}, the "
          f"run generates {run.shape}; use reference data of the same size")
    if run.num_classes:
        check_same_classes(run.class_names, ref.class_names, f"reference {name!r}")
    return ref.x.reshape(len(ref), -1).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    try:
        return {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval}[args.command](args)
    except MeanFlowError as exc:
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meanflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
