"""``meanflow export``: a training run's network as ``config.json`` + ``model.safetensors``
(:mod:`meanflow.runs.pretrained`), the folder ``meanflow.from_pretrained``, ``MeanFlowPipeline`` and
``meanflow sample --run`` read."""

from __future__ import annotations

import argparse
import json

EXPORT_EPILOG = """\
examples:
  meanflow export --run runs/fmnist --out exported/fmnist
  meanflow export --run runs/cifar --weights ema-0.99995 --out exported/cifar
  meanflow sample --run exported/fmnist --num 64 --out grid.png

Python: meanflow.from_pretrained("exported/fmnist"). See docs/interop.md.
"""


def add_export_parser(sub) -> None:
    """Register ``meanflow export`` on the sub-command set ``sub``."""
    p = sub.add_parser(
        "export",
        help="write a run's network as config.json + model.safetensors",
        description="Export the network of a training run (its newest good "
        "checkpoint) as a Hugging Face-style folder: config.json and "
        "model.safetensors. Prints one JSON line.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="DIR", help="run directory of meanflow train")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument(
        "--weights",
        default="ema",
        metavar="NAME",
        help="ema (default: the primary EMA), raw, or an extra EMA by name or decay",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the model in --out if it holds one"
    )


def cmd_export(args) -> int:
    """``meanflow export``: see :func:`add_export_parser`."""
    import os

    from ..config.build import count_parameters
    from ..runs.load import load_run
    from ..runs.pretrained import save_pretrained

    run = load_run(args.run, weights=args.weights)
    out = save_pretrained(run, args.out, overwrite=args.overwrite)
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    print(
        json.dumps(
            {
                "out": out,
                "step": run.step,
                "weights": run.weights,
                "parameters": count_parameters(run.model),
                "bytes": size,
            }
        )
    )
    return 0
