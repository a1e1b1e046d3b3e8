"""Option handling shared by several commands."""

from __future__ import annotations

from ..errors import check


def weights_option(args) -> str:
    """The weights ``--weights NAME`` / ``--raw`` of ``meanflow sample`` and ``eval`` ask for."""
    check(
        not (args.raw and args.weights not in (None, "raw")),
        f"--raw and --weights {args.weights} ask for different weights; give one",
    )
    return "raw" if args.raw else (args.weights or "ema")
