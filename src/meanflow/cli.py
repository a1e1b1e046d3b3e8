"""The ``meanflow`` command: ``train``, ``sample``, ``eval`` and the tools beside them.

Every user error is printed as one line ``meanflow: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import MeanFlowError, check
from .eval.command import add_eval_parser, cmd_eval
from .sample_command import add_sample_parser, cmd_sample
from .train.command import add_train_parser, cmd_train


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
    add_sample_parser(sub)
    add_eval_parser(sub)
    _features_parser(sub)
    from .latents_command import add_latents_parser
    add_latents_parser(sub)
    from .convert_command import add_convert_parser
    add_convert_parser(sub)
    from .ablate_command import add_ablate_parser
    add_ablate_parser(sub)
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
        from .ablate_command import cmd_ablate
        from .convert_command import cmd_convert
        from .latents_command import cmd_latents

        return {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                "features": cmd_features, "latents": cmd_latents,
                "convert": cmd_convert, "ablate": cmd_ablate}[args.command](args)
    except MeanFlowError as exc:
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meanflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
