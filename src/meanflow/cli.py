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
from .eval.command import add_eval_parser, cmd_eval
from .train.command import add_train_parser, cmd_train


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
    p.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance at sampling time on top of the trained model: "
                        "u_null + W (u_y - u_null); W != 1 costs two evaluations per step "
                        "(default 1: the model as trained, one evaluation)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy, .png or .npz")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _features_parser(sub) -> None:
    p = sub.add_parser("features", help="train a feature network for FD on small images",
                       description="Feature networks give Frechet distances and precision/"
                                   "recall on small images (FD-FMNIST, FD-digits); see "
                                   "docs/evaluation.md.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a classifier whose penultimate layer is the "
                                         "feature space; prints its test accuracy")
    t.add_argument("--data", required=True, metavar="NAME_OR_PATH",
                   help="labelled image data: fashion-mnist, digits, or a folder of class folders")
    t.add_argument("--data-dir", metavar="DIR", help="folder of the fashion-mnist IDX files")
    t.add_argument("--image-size", type=int, default=0, metavar="S",
                   help="resize folder images / digits size (as for train)")
    t.add_argument("--out", required=True, metavar="FILE.safetensors",
                   help="weights to write (a .json with accuracy and fingerprint goes beside)")
    t.add_argument("--epochs", type=int, default=8, metavar="E", help="epochs (default 8)")
    t.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    t.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


class Parser(argparse.ArgumentParser):
    """argparse with our error format: one line ``meanflow: error: ...`` (exit 2), naming the
    closest valid option for a misspelled one."""

    options: set[str] = set()

    def error(self, message: str):
        import difflib
        import re

        if message.startswith("unrecognized arguments"):
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], sorted(Parser.options), n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        invalid = re.search(r"invalid choice: '([^']*)'", message)
        if invalid:
            choices = sorted({str(c) for a in self._actions for c in (a.choices or ())})
            close = difflib.get_close_matches(invalid.group(1), choices, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        where = "" if self.prog == "meanflow" else f"{self.prog}: "  # name a subcommand once
        self.exit(2, f"meanflow: error: {where}{message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="meanflow", description="Train and sample one-step generative models with MeanFlow "
        "(Geng et al. 2025). Conventions: t=0 data, t=1 noise; one step is x = e - u(e, 0, 1).")
    parser.add_argument("--version", action="version", version=f"meanflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    _sample_parser(sub)
    add_eval_parser(sub)
    _features_parser(sub)
    for command in _leaf_parsers(sub):
        command.add_argument("--threads", default="auto", metavar="N",
                             help="CPU threads for PyTorch (default auto: one per core this "
                                  "process may use that other processes are not keeping busy; "
                                  "OMP_NUM_THREADS if set); see docs/benchmarks.md, Threads")
    Parser.options = {o for p in sub.choices.values() for a in p._actions
                      for o in a.option_strings if o.startswith("--")}
    return parser


def _leaf_parsers(sub) -> list[argparse.ArgumentParser]:
    """The parsers of every command, including nested ones (``features train``)."""
    leaves = []
    for command in sub.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += _leaf_parsers(nested[0]) if nested else [command]
    return leaves


def cmd_sample(args) -> int:
    from .plotting import image_grid_png, scatter_png, to_uint8
    from .train import load_run
    from .train.factory import resolve_device
    from .sampling import parse_schedule
    from .train.run import grid_columns, parse_classes

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
    schedule = parse_schedule(args.schedule)
    points = run.sample(args.num, steps=args.steps, seed=args.seed,
                        schedule=schedule, device=device, labels=labels,
                        guidance=args.guidance)
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
        image_grid_png(tmp, points, ncol, scale=max(1, 64 // run.shape[1]),
                       class_names=run.class_names, labels=labels)
    else:
        label = args.schedule or f"{args.steps} step{'s' if args.steps > 1 else ''}"
        scatter_png(tmp, [(f"{run.config.objective}, {label} ({run.weights})", points)])
    os.replace(tmp, args.out)
    print(json.dumps({"out": args.out, "num": args.num,
                      "steps": len(schedule) - 1 if schedule else args.steps,
                      "schedule": schedule, "guidance": args.guidance,
                      "weights": run.weights,
                      "classes": None if labels is None else sorted(set(labels.tolist())),
                      "checkpoint_step": run.step}))
    return 0


def cmd_features(args) -> int:
    import time

    from .data import open_data
    from .eval.features import save_feature_net, train_feature_net

    check(args.overwrite or not os.path.exists(args.out), f"{args.out!r} already exists; pass "
          "--overwrite to replace it or choose another name")
    data = open_data(args.data, directory=args.data_dir or "", size=args.image_size)
    check(data.kind == "images" and data.labels is not None, f"{args.data!r} is not labelled "
          "image data; a feature network is a classifier of the dataset's classes")
    if args.data in ("fashion-mnist", "cifar10"):
        test = open_data(args.data, directory=args.data_dir or "", split="test")
        train_x, train_y, test_x, test_y = data.x, data.labels, test.x, test.labels
    else:  # hold out a seeded 20% for the accuracy
        import torch
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
        cut = len(data) - len(data) // 5
        train_x, train_y = data.x[perm[:cut]], data.labels[perm[:cut]]
        test_x, test_y = data.x[perm[cut:]], data.labels[perm[cut:]]
    start = time.perf_counter()
    model, acc = train_feature_net(train_x, train_y, test_x, test_y, data.num_classes,
                                   epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    meta = save_feature_net(model, args.out, {
        "data": args.data, "image_shape": list(data.shape), "classes": data.class_names,
        "test_accuracy": acc, "test_num": len(test_x), "epochs": args.epochs, "seed": args.seed,
        "train_seconds": round(time.perf_counter() - start, 1)})
    print(json.dumps({"out": args.out, "test_accuracy": acc, "test_num": len(test_x),
                      "fingerprint": meta["fingerprint"], "seconds": meta["train_seconds"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    try:
        from .threads import set_threads

        args.thread_choice = set_threads(args.threads)
        return {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                "features": cmd_features}[args.command](args)
    except MeanFlowError as exc:
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meanflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
