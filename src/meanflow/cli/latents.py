"""``meanflow latents encode``: an image folder as VAE latents (:mod:`meanflow.data.encode`)."""

from __future__ import annotations

import argparse
import json

from ..errors import MeanFlowError

LATENTS_EPILOG = """\
examples:
  meanflow latents encode --data imagenet/train --vae vae/sd-vae-ft-mse --out latents/in256
  meanflow latents encode --data my_images/ --vae vae/sd-vae-ft-mse --out latents/mine \\
      --image-size 128 --flip --dtype float16
  meanflow train --data latents/in256 --out runs/in256        # trains in latent space

Rerun the same command to resume an encode that was stopped. See docs/latents.md.
"""


def add_latents_parser(sub) -> None:
    """Register ``meanflow latents encode`` on the sub-command set ``sub``."""
    p = sub.add_parser(
        "latents",
        help="encode images into VAE latents (latent-space training)",
        description="Work with VAE latents: `encode` turns an image folder into a "
        "latents directory that `meanflow train --data` accepts.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = actions.add_parser(
        "encode",
        help="encode an image folder with a diffusers VAE (e.g. the SD-VAE)",
        description="Centre-crop every image as ADM does, encode it (with --flip also its "
        "mirror) with a local diffusers AutoencoderKL, and write the posterior mean and std "
        "in shards of LATENTS (moments-K.npy, labels-K.npy, latents.json). Prints "
        "one JSON line at the end.",
        epilog=LATENTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "--data",
        required=True,
        metavar="IMAGE_FOLDER",
        help="PNG/JPEG files, flat (unlabelled) or one sub-folder per class (labels "
        "follow the sorted folder names)",
    )
    e.add_argument(
        "--vae",
        required=True,
        metavar="DIR",
        help="local folder of a diffusers AutoencoderKL (config.json and "
        "diffusion_pytorch_model.safetensors), e.g. stabilityai/sd-vae-ft-ema "
        "downloaded beforehand; never downloaded here",
    )
    e.add_argument("--out", required=True, metavar="LATENTS", help="latents directory to write")
    e.add_argument(
        "--image-size",
        type=int,
        default=256,
        metavar="S",
        help="centre-crop size in pixels (default 256; a multiple of the VAE's "
        "downsampling, 8 for the SD-VAE)",
    )
    e.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="B",
        help="images per VAE call (default 32; with --flip each also with its mirror)",
    )
    e.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        metavar="N",
        help="images per shard file (default 1024)",
    )
    e.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also encode each image's horizontal mirror (F = 2; twice the disk and time), "
        "for training with --set hflip=true; default off, as the MeanFlow authors encode",
    )
    e.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage type of the moments (default float32)",
    )
    e.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="W",
        help="processes that read and crop images (default 0: this process)",
    )
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_latents(args) -> int:
    """Run ``meanflow latents ACTION``; prints one JSON line."""
    if args.action == "encode":
        from ..data.encode import encode_folder

        result = encode_folder(
            args.data,
            args.vae,
            args.out,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            flip=args.flip,
            dtype=args.dtype,
            device=args.device,
            workers=args.workers,
            progress=not args.quiet,
        )
        print(json.dumps(result))
        return 0
    raise MeanFlowError(f"unknown latents action {args.action!r}; use encode")
