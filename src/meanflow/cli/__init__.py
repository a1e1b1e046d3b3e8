"""The ``meanflow`` command: ``train``, ``sample``, ``eval`` and the tools beside them, one
module per command in this package (``add_<command>_parser`` and ``cmd_<command>``); the library
(``meanflow.train``, ``meanflow.eval``, ...) parses no arguments.

Every user error is printed as one line ``meanflow: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MeanFlowError
from .ablate import add_ablate_parser, cmd_ablate
from .convert import add_convert_parser, cmd_convert
from .eval import add_eval_parser, cmd_eval
from .export import add_export_parser, cmd_export
from .features import add_features_parser, cmd_features
from .latents import add_latents_parser, cmd_latents
from .sample import add_sample_parser, cmd_sample
from .train import add_train_parser, cmd_train

COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "features": cmd_features,
    "latents": cmd_latents,
    "convert": cmd_convert,
    "ablate": cmd_ablate,
    "export": cmd_export,
}


class Parser(argparse.ArgumentParser):
    """argparse with our error format: one line ``meanflow: error: ...`` (exit 2), naming the
    closest valid option for a misspelled one."""

    options: set[str] = set()
    argv: list[str] = []  # the arguments being parsed, for hints that need their order

    def error(self, message: str):
        import difflib
        import re

        if message.startswith("unrecognized arguments"):
            spaced = _spaced_set(Parser.argv, message.split(":", 1)[1].split())
            message += spaced
            for word in message.split(":", 1)[1].split() if not spaced else ():
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


def _spaced_set(argv: list[str], unrecognized: list[str]) -> str:
    """`` (did you mean --set KEY=VALUE?)`` when ``argv`` holds ``--set KEY VALUE``, the value
    given as a separate argument (left over as unrecognized), else ``""``."""
    for i in range(len(argv) - 2):
        key, value = argv[i + 1], argv[i + 2]
        if argv[i] == "--set" and "=" not in key and value in unrecognized:
            return f" (did you mean --set {key}={value}?)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="meanflow",
        description="Train and sample one-step generative models with MeanFlow "
        "(Geng et al. 2025). Conventions: t=0 data, t=1 noise; one step is x = e - u(e, 0, 1).",
    )
    parser.add_argument("--version", action="version", version=f"meanflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_train_parser,
        add_sample_parser,
        add_eval_parser,
        add_features_parser,
        add_latents_parser,
        add_convert_parser,
        add_ablate_parser,
        add_export_parser,
    ):
        add(sub)
    for command in _leaf_parsers(sub):
        command.add_argument(
            "--threads",
            default="auto",
            metavar="N",
            help="CPU threads for PyTorch (default auto: one per core this "
            "process may use that other processes are not keeping busy; "
            "OMP_NUM_THREADS if set); see docs/benchmarks.md, Threads",
        )
    Parser.options = {
        o
        for p in sub.choices.values()
        for a in p._actions
        for o in a.option_strings
        if o.startswith("--")
    }
    return parser


def _leaf_parsers(sub) -> list[argparse.ArgumentParser]:
    """The parsers of every command, including nested ones (``features train``)."""
    leaves: list[argparse.ArgumentParser] = []
    for command in sub.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += _leaf_parsers(nested[0]) if nested else [command]
    return leaves


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    try:
        from ..runtime.threads import set_threads

        args.thread_choice = set_threads(args.threads)
        return COMMANDS[args.command](args)
    except MeanFlowError as exc:
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meanflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
