"""``meanflow convert``: the MeanFlow authors' released checkpoints as meanflow runs
(:mod:`meanflow.runs.authors`; formats in docs/convert.md)."""

from __future__ import annotations

import argparse
import json
import sys

CONVERT_EPILOG = """\
examples:
  meanflow convert --from authors-jax --checkpoint ckpt/checkpoint_1200000 --out runs/mf-b4
  meanflow sample --run runs/mf-b4 --num 64 --vae vae/sd-vae-ft-mse --out b4.png
  meanflow convert --from authors-torch --checkpoint checkpoint-last.pth --out runs/cifar
  meanflow convert --from authors-jax --checkpoint ckpt.msgpack --out dit.safetensors

See docs/convert.md for the formats and what cannot be converted.
"""


def add_convert_parser(sub) -> None:
    """Register ``meanflow convert`` on the sub-command set ``sub``."""
    p = sub.add_parser(
        "convert",
        help="convert the MeanFlow authors' released checkpoints",
        description="Map the parameters of the authors' JAX DiT (flax msgpack) or "
        "py-meanflow U-Net (PyTorch .pth) onto our networks and write "
        "a run directory that `meanflow sample --run` reads (or a "
        ".safetensors state dict). Prints one JSON line.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("authors-jax", "authors-torch"),
        help="authors-jax: github.com/Gsunshine/meanflow (DiT on SD-VAE latents); "
        "authors-torch: github.com/Gsunshine/py-meanflow (CIFAR-10 U-Net)",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="authors-jax: a checkpoint_<step> folder, the folder holding them (the "
        "newest is used) or a msgpack file; authors-torch: the .pth file",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR_OR_FILE",
        help="run directory to write, or FILE.safetensors for the EMA state dict only",
    )
    p.add_argument(
        "--arch",
        choices=("dit", "unet", "songunet"),
        help="network (default: dit for authors-jax; for authors-torch songunet, "
        "EDM's DDPM++ U-Net (model.arch songunet), also spelled unet)",
    )
    p.add_argument(
        "--weights",
        metavar="NAME",
        help="which weights become the run's EMA: authors-jax ema_params (default) "
        "or params; authors-torch net_ema1 (default when present: their demo "
        "samples with it), net_ema, net_ema2 or net",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        metavar="S",
        help="authors-jax: the latent size the DiT was trained on (not stored in "
        "the weights; default 32, their ImageNet 256x256 latents)",
    )
    p.add_argument(
        "--vae",
        default="",
        metavar="DIR",
        help="authors-jax: diffusers VAE folder recorded for decoding samples "
        "(their latents: sd-vae-ft-mse, scaled by 0.18215); `meanflow sample "
        "--vae` can give it later",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def cmd_convert(args) -> int:
    """``meanflow convert``: see :func:`add_convert_parser` and docs/convert.md."""
    from ..runs.authors import ConvertRequest, convert

    summary = convert(
        ConvertRequest(
            args.source,
            args.checkpoint,
            args.out,
            args.arch,
            args.weights,
            args.image_size,
            args.vae,
            args.overwrite,
        )
    )
    if str(summary.get("step_from", "")).startswith("unknown"):
        print(f"meanflow: step {summary['step_from']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0
