"""``meanflow sample``: samples of a trained run written as .npy, .npz (ADM layout) or .png.

The .npy and .npz outputs are streamed, so memory stays bounded whatever ``--num`` is (FID-50K
of 256x256 images is about 9.8 GB of uint8). Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank
samples a contiguous range of the noise chunks of :func:`~meanflow.runs.noise.iter_noise` into
a part file beside ``--out``; rank 0 then joins the parts into one file. Row i depends only on
the seed and i, so the output is the same for any number of processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from ..errors import check
from ..runs.sample_files import rank_rows, read_blocks, write_npy, write_npz
from ..runtime import distributed


def add_sample_parser(sub) -> None:
    """The ``sample`` command's options on the subparsers ``sub``."""
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Sample a trained run with z_r = z_t - (t - r) u(z_t, r, t); "
        "writes .npy (N, ...) float32 in data units; .png: a scatter "
        "plot of vectors or a grid of images; .npz (images): uint8 "
        "(N, H, W, C) as arr_0 and labels as arr_1 (ADM layout). "
        ".npy and .npz are streamed (bounded memory); under torchrun "
        "the ranks split the samples and rank 0 writes one file, the "
        "same as one process writes (see docs/evaluation.md).",
    )
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        metavar="RUN_DIR",
        help="run directory from train (under torchrun spell it --run-dir: torchrun "
        "takes --run for its --run-path)",
    )
    p.add_argument(
        "--num",
        "--num-samples",
        dest="num",
        type=int,
        required=True,
        metavar="N",
        help="number of samples (under torchrun spell it --num-samples: torchrun "
        "takes --num for its --numa-binding)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=1,
        metavar="K",
        help="uniform sampling steps from t=1 to t=0 (default 1: one evaluation)",
    )
    p.add_argument(
        "--schedule",
        metavar="T0,T1,...",
        help="explicit decreasing times, e.g. 1,0.6,0 (overrides --steps)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument(
        "--weights",
        metavar="NAME",
        help="which weights: ema (default: the primary EMA), raw, or an extra EMA "
        "of the run (ema_extra) by decay or name, e.g. 0.99995 or ema-0.99995",
    )
    p.add_argument("--raw", action="store_true", help="the raw weights (= --weights raw)")
    p.add_argument(
        "--class",
        dest="classes",
        metavar="LABELS",
        help="class-conditional runs: one label, a comma list (cycled), 'random', "
        "'none' (the null label: unguided, unconditional), class names allowed "
        "(default: cycle through all classes)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        metavar="W",
        help="classifier-free guidance at sampling time on top of the trained model: "
        "u_null + W (u_y - u_null); W != 1 costs two evaluations per step "
        "(default 1: the model as trained, one evaluation)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy, .png or .npz")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="runs trained on latents: the diffusers VAE "
        "directory to decode with (default: the one the latents were encoded with)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_sample(args) -> int:
    """``meanflow sample``: see :func:`add_sample_parser` and docs/evaluation.md."""
    from ..flow.sampling import parse_schedule
    from ..runs.load import load_run
    from ..runs.run import parse_classes
    from ..runtime.devices import resolve_device
    from .options import weights_option

    ext = os.path.splitext(args.out)[1].lower()
    check(
        ext in (".npy", ".png", ".npz"), f"--out must end in .npy, .png or .npz, got {args.out!r}"
    )
    check(not os.path.isdir(args.out), f"--out {args.out!r} is a directory; give a file name")
    check(
        args.overwrite or not os.path.exists(args.out),
        f"{args.out!r} already exists; pass --overwrite to replace it or choose another name",
    )
    check(args.num >= 1, f"--num must be >= 1, got {args.num}")
    check(
        ext != ".png" or not distributed.from_env().active,
        "a .png grid is made by one "
        "process: run it without torchrun (under torchrun write .npy or .npz)",
    )
    info, device = distributed.init(resolve_device(args.device))
    run = load_run(args.run, weights_option(args), device, vae=args.vae)
    check(
        ext != ".npz" or run.is_image,
        ".npz output holds uint8 images; this run samples vectors, use .npy",
    )
    labels = parse_classes(args.classes, args.num, run, args.seed)
    schedule = parse_schedule(args.schedule)
    sampling = dict(
        steps=args.steps,
        seed=args.seed,
        schedule=schedule,
        device=device,
        labels=labels,
        guidance=args.guidance,
    )
    if ext == ".png":
        _write_png(args, run, sampling)
    else:
        _write_stream(args, ext, run, sampling, info)
    if info.is_main:
        print(
            json.dumps(
                {
                    "out": args.out,
                    "num": args.num,
                    "steps": len(schedule) - 1 if schedule else args.steps,
                    "schedule": schedule,
                    "guidance": args.guidance,
                    "weights": run.weights,
                    "classes": None if labels is None else sorted(set(labels.tolist())),
                    "checkpoint_step": run.step,
                }
            )
        )
    distributed.shutdown()
    return 0


def _write_png(args, run, sampling: dict) -> None:
    """A scatter plot of vectors or a grid of images (one process, all samples in memory)."""
    from ..plotting import image_grid_png, scatter_png
    from ..runs.run import grid_columns

    tmp = args.out + ".tmp.png"
    points, labels = run.sample(args.num, **sampling), sampling["labels"]
    if run.is_image:
        ncol = grid_columns(args.num, run.num_classes if labels is not None else 0)
        image_grid_png(
            tmp,
            points,
            ncol,
            scale=max(1, 64 // run.shape[1]),
            class_names=run.class_names,
            labels=labels,
        )
    else:
        label = args.schedule or f"{args.steps} step{'s' if args.steps > 1 else ''}"
        scatter_png(tmp, [(f"{run.config.objective}, {label} ({run.weights})", points)])
    os.replace(tmp, args.out)


def _write_stream(args, ext: str, run, sampling: dict, info: distributed.Dist) -> None:
    """.npy or .npz streamed: straight into ``OUT.tmp.EXT`` in one process; under torchrun
    each rank's rows into a part file, joined by rank 0 after a barrier. Rank 0 then renames
    the file to ``--out``."""
    from ..plotting import to_uint8
    from ..runs.noise import NOISE_CHUNK

    def convert(x):
        return to_uint8(x.numpy()) if ext == ".npz" else x.numpy().astype(np.float32, copy=False)

    labels = None if sampling["labels"] is None else sampling["labels"].numpy().astype(np.int64)
    progress = not args.quiet and info.is_main
    tmp = args.out + ".tmp" + ext
    start, stop = rank_rows(args.num, info.rank, info.world_size)
    # batches of whole noise chunks: the same batches for any world size
    chunks = run.iter_samples(args.num, start=start, stop=stop, batch=NOISE_CHUNK, **sampling)
    first = next(chunks, None)  # its checks fail here, before a bar or a file appears
    if first is not None:  # rank 0 always has rows; others may have none (no part file)
        first = convert(first)
        desc = f"sampling (rank 0 of {info.world_size})" if info.active else "sampling"
        with tqdm(
            total=stop - start, disable=not progress, unit="sample", desc=desc, dynamic_ncols=True
        ) as bar:

            def blocks():
                bar.update(len(first))
                yield first
                for chunk in chunks:
                    bar.update(len(chunk))
                    yield convert(chunk)

            shape = (stop - start, *first.shape[1:])
            if info.active:
                _write_file(
                    _part_path(args.out, info.rank, info.world_size),
                    ".npy",
                    shape,
                    first.dtype,
                    blocks(),
                    None,
                )
            else:
                _write_file(tmp, ext, shape, first.dtype, blocks(), labels)
    if info.active:
        distributed.barrier()
        if info.is_main:
            assert first is not None  # rank 0 always has rows
            _join_parts(
                args, ext, first.shape[1:], first.dtype, labels, tmp, info.world_size, progress
            )
    if info.is_main:
        os.replace(tmp, args.out)


def _part_path(out: str, rank: int, world: int) -> str:
    return f"{out}.part{rank}-of-{world}.npy"


def _write_file(
    path: str,
    ext: str,
    shape: tuple[int, ...],
    dtype,
    blocks: Iterable[np.ndarray],
    labels: np.ndarray | None,
) -> None:
    """Write ``path`` (.npy, or .npz with ``labels``) from ``blocks``; on failure remove the
    half-written file."""
    try:
        if ext == ".npz":
            write_npz(path, blocks, shape, labels)
        else:
            with open(path, "wb") as f:
                write_npy(f, shape, dtype, blocks)
    except BaseException:
        _remove(path)
        raise


def _join_parts(
    args,
    ext: str,
    sample_shape: tuple[int, ...],
    dtype,
    labels,
    tmp: str,
    world: int,
    progress: bool,
) -> None:
    """Rank 0: the part files of the ranks that had rows, in rank order, into ``tmp``; the parts
    are removed."""
    parts = []
    for rank in range(world):
        start, stop = rank_rows(args.num, rank, world)
        if stop == start:
            continue
        part = _part_path(args.out, rank, world)
        check(
            os.path.isfile(part),
            f"the samples of rank {rank} ({part!r}) are missing; with "
            "several nodes --out must be on a file system all nodes share",
        )
        found = np.load(part, mmap_mode="r").shape
        check(
            found == (stop - start, *sample_shape),
            f"{part!r} holds {found}, expected "
            f"{(stop - start, *sample_shape)}; was it written by another command?",
        )
        parts.append(part)
    with tqdm(
        total=args.num, disable=not progress, unit="sample", desc="writing", dynamic_ncols=True
    ) as bar:
        _write_file(tmp, ext, (args.num, *sample_shape), dtype, read_blocks(parts, bar), labels)
    for part in parts:
        _remove(part)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
