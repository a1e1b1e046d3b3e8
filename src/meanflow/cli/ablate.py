"""``meanflow ablate``: rerun one of the paper's ablations (or compare the objectives) on any
data, one training run per setting, with Markdown / CSV tables and a plot
(:mod:`meanflow.train.ablation`)."""

from __future__ import annotations

import os
import sys

from ..errors import check

ABLATE_EPILOG = """\
examples:
  meanflow ablate --study ratio --data checkerboard --steps 2000 --out ablations/ratio
  meanflow ablate --study p --data digits --preset digits-small --steps 1000 --out abl/p
  meanflow ablate --study objective --data fashion-mnist --preset fashion-mnist-small --out o
studies: ratio, tangent, time-input, sampler, p, omega, kappa, objective (docs/ablations.md)
"""


def add_ablate_parser(sub) -> None:
    import argparse

    from ..train.ablation import STUDIES

    p = sub.add_parser(
        "ablate",
        help="rerun one of the paper's ablations on your data",
        description="Train one model per setting of a study (the paper's Table 1, "
        "or the objectives), evaluate each at 1 and 2 sampling steps "
        "with 'meanflow eval', and write table.md, results.csv and "
        "plot.png. Finished settings are reused when rerun.",
        epilog=ABLATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--study", required=True, choices=list(STUDIES), help="which ablation")
    p.add_argument("--data", required=True, metavar="NAME_OR_PATH", help="as for train")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for runs and tables")
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="preset every setting starts from (default: the data's default)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="training steps per setting (default: the preset's)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every setting (applied before the study's own)",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="NAME_OR_PATH",
        help="reference for 'meanflow eval' (default: the data itself)",
    )
    p.add_argument(
        "--num", type=int, default=2000, metavar="N", help="samples per evaluation (default 2000)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--overwrite", action="store_true", help="retrain settings that already finished"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_ablate(args) -> int:
    from ..config.overrides import parse_overrides
    from ..config.presets import configure, default_preset
    from ..config.schema import TrainConfig
    from ..train.ablation import run_study, write_report
    from ..train.batches import open_training_data

    check(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    check(args.num >= 2, f"--num must be >= 2, got {args.num}")
    os.makedirs(args.out, exist_ok=True)
    base = [("data", args.data), *parse_overrides(args.set)]
    if args.steps:
        base.append(("steps", args.steps))
    preset = args.preset
    if preset is None:  # as train picks it: from the data's kind and shape
        probe = configure(TrainConfig(), None, base)
        data = open_training_data(probe)
        preset = default_preset(data.kind, data.shape, probe.data)
    rows = run_study(
        args.study,
        base,
        args.out,
        preset=preset,
        reference=args.reference or args.data,
        num=args.num,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
        log=lambda message: print(f"meanflow: {message}", file=sys.stderr),
    )
    print(write_report(args.study, rows, args.out, args.data), end="")
    return 0
