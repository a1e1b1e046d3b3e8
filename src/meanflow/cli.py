"""The ``meanflow`` command: ``train``, ``sample`` and ``eval``.

Every user error is printed as one line ``meanflow: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .errors import MeanFlowError, check

TRAIN_EPILOG = """\
examples:
  meanflow train --data checkerboard --out runs/checker
  meanflow train --data my_points.npy --out runs/mine --steps 20000 --set time.ratio=0.5
  meanflow train --out runs/checker --resume --steps 8000

config keys for --set (see docs/configuration.md for meanings and defaults):
  {keys}
presets: {presets}
"""


def _train_parser(sub) -> None:
    from .train.config import PRESETS, config_keys

    p = sub.add_parser(
        "train", help="train a MeanFlow (or flow-matching) model",
        description="Train a model and write a run directory: config.json, metrics.jsonl, "
                    "checkpoints/ (safetensors + JSON) and samples-1step.png.",
        epilog=TRAIN_EPILOG.format(keys="\n  ".join(config_keys()), presets=", ".join(PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="NAME_OR_PATH",
                   help="built-in 2-D distribution (checkerboard, eight-gaussians, two-moons, "
                        "rings) or a .npy/.npz file holding an (N, D) float array")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--preset", help="named settings (default: toy-2d for 2-D data, mlp otherwise)")
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


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run with z_r = z_t - (t - r) u(z_t, r, t); "
                                   "writes .npy (N, D) float32, or a scatter plot for .png.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory from train")
    p.add_argument("--num", type=int, required=True, metavar="N", help="number of samples")
    p.add_argument("--steps", type=int, default=1, metavar="K",
                   help="uniform sampling steps from t=1 to t=0 (default 1: one evaluation)")
    p.add_argument("--schedule", metavar="T0,T1,...",
                   help="explicit decreasing times, e.g. 1,0.6,0 (overrides --steps)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy or .png")
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
                   help="built-in distribution (fresh draws, independent of the training set) "
                        "or a .npy/.npz file of reference points")
    p.add_argument("--steps", type=int, default=1, metavar="K", help="sampling steps (default 1)")
    p.add_argument("--num", type=int, default=5000, metavar="N",
                   help="samples drawn, and reference points drawn for a built-in (default 5000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument("--projections", type=int, default=DEFAULT_PROJECTIONS, metavar="P",
                   help=f"random projections for SWD (default {DEFAULT_PROJECTIONS})")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="meanflow", description="Train and sample one-step generative models with MeanFlow "
        "(Geng et al. 2025). Conventions: t=0 data, t=1 noise; one step is x = e - u(e, 0, 1).")
    parser.add_argument("--version", action="version", version=f"meanflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    return parser


def _train_config(args):
    from .data import load_vectors
    from .train.checkpoint import latest_checkpoint, load_checkpoint
    from .train.config import TrainConfig, configure, default_preset, parse_overrides

    flags = [(k, v) for k, v in (("data", args.data), ("objective", args.objective),
                                 ("batch_size", args.batch_size), ("seed", args.seed))
             if v is not None]
    settings = flags + parse_overrides(args.set)
    if args.resume:
        check(not args.overwrite, "--resume and --overwrite contradict each other; pick one")
        _, meta = load_checkpoint(latest_checkpoint(args.out))
        cfg = TrainConfig.from_dict(meta["config"])
        saved = cfg.to_dict()
        requested = configure(cfg, args.preset, settings).to_dict()
        changed = [k for k, v in requested.items() if k != "steps" and saved[k] != v]
        check(not changed, f"--resume continues the saved configuration; these settings differ: "
              f"{', '.join(changed)} (only --steps may change)")
    else:
        check(args.data is not None, "--data is required (a built-in name or a .npy/.npz path)")
        preset = args.preset
        if preset is None:
            preset = default_preset(load_vectors(args.data, num=2, seed=0).shape[1])
            print(f"meanflow: no --preset given; using {preset!r}", file=sys.stderr)
        cfg = configure(TrainConfig(), preset, settings)
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.validate()
    return cfg


def cmd_train(args) -> int:
    from .train import train
    from .train.factory import resolve_device

    cfg = _train_config(args)
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                   device=resolve_device(args.device), progress=not args.quiet)
    print(json.dumps({"run": result.run_dir, "step": result.step, "loss": result.final_loss,
                      "seconds": round(result.seconds, 2), "skipped_steps": result.skipped_steps,
                      "samples_png": os.path.join(result.run_dir, "samples-1step.png")}))
    return 0


def _schedule(text):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MeanFlowError(f"--schedule expects comma-separated numbers, got {text!r}") from None


def cmd_sample(args) -> int:
    from .plotting import scatter_png
    from .train import load_run
    from .train.factory import resolve_device

    ext = os.path.splitext(args.out)[1].lower()
    check(ext in (".npy", ".png"), f"--out must end in .npy or .png, got {args.out!r}")
    check(not os.path.isdir(args.out), f"--out {args.out!r} is a directory; give a file name")
    check(args.overwrite or not os.path.exists(args.out),
          f"{args.out!r} already exists; pass --overwrite to replace it or choose another name")
    device = resolve_device(args.device)
    run = load_run(args.run, "raw" if args.raw else "ema", device)
    points = run.sample(args.num, steps=args.steps, seed=args.seed,
                        schedule=_schedule(args.schedule), device=device)
    tmp = args.out + ".tmp" + ext
    if ext == ".npy":
        np.save(tmp, points)
    else:
        label = args.schedule or f"{args.steps} step{'s' if args.steps > 1 else ''}"
        scatter_png(tmp, [(f"{run.config.objective}, {label} ({run.weights})", points)])
    os.replace(tmp, args.out)
    print(json.dumps({"out": args.out, "num": args.num, "steps": args.steps,
                      "schedule": _schedule(args.schedule), "weights": run.weights,
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
    if args.reference in TOY_DATASETS:
        reference = load_vectors(args.reference, num=args.num, seed=10_000 + args.seed)
    else:
        reference = load_vectors(args.reference)
    samples = run.sample(args.num, steps=args.steps, seed=args.seed, device=device)
    print(json.dumps({
        "swd": sliced_wasserstein(samples, reference, projections=args.projections),
        "energy_distance": energy_distance(samples, reference),
        "steps": args.steps, "num": args.num, "reference": args.reference,
        "reference_num": int(reference.shape[0]), "projections": args.projections,
        "weights": run.weights, "seed": args.seed, "checkpoint_step": run.step}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
