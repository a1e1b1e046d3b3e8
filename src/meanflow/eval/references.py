"""Reference data for the evaluation protocol, resolved from one string as ``meanflow eval
--reference`` takes it:

=================  ========================================================================
vector runs        ``num`` fresh draws of a built-in 2-D distribution (seed ``10000 + seed``,
                   so independent of the training set), or the (N, D) points of a .npy/.npz
image runs         an image dataset (fashion-mnist and cifar10: their test split; digits:
                   the whole set), a folder of images, or a .npz of precomputed statistics
                   (``mu`` (d,), ``sigma`` (d, d); ``fid`` only)
latent runs        a folder of images, center-cropped as the encoded ones were
=================  ========================================================================

A reference of the other kind (images for a vector run, vectors for an image run) and a run
directory given as a reference are refused with one line saying so.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

from ..data import IMAGE_DATASETS, TOY_DATASETS, check_same_classes, load_vectors, open_data
from ..data.arrays import check_numpy_header, read_error
from ..data.encode import cropped_images
from ..data.sources import check_not_a_run
from ..errors import MeanFlowError, check, plural


def _kind_of_name(name: str) -> str | None:
    """``"vectors"`` or ``"images"`` when the name alone tells (a built-in set, a folder),
    None when only the file's contents will."""
    if name in TOY_DATASETS:
        return "vectors"
    if name in IMAGE_DATASETS or os.path.isdir(name):
        return "images"
    return None


def _refuse_kind(name: str, kind: str, run) -> None:
    """One line: the reference holds ``kind`` but ``run`` generates the other kind."""
    if run.is_image:
        shape = "x".join(map(str, run.sample_shape))
        what = (
            "is vectors (a built-in 2-D distribution)" if name in TOY_DATASETS else "holds vectors"
        )
        raise MeanFlowError(
            f"reference {name!r} {what} but the run generates images ({shape}); "
            "compare an image run with images: an image dataset (fashion-mnist, digits, "
            "cifar10), a folder of images, or a .npz of precomputed statistics (mu, sigma)"
        )
    dim = run.sample_shape[0]
    what = "is a folder of images" if os.path.isdir(name) else f"is {kind}"
    raise MeanFlowError(
        f"reference {name!r} {what} but the run generates vectors "
        f"({plural(dim, 'dimension')}); compare a vector run with points: a built-in "
        f"distribution ({', '.join(TOY_DATASETS)}) or a .npy/.npz file of (N, {dim}) points"
    )


def check_reference(name: str, run) -> None:
    """Refuse a run directory or exported model, and a reference whose name says it is of the
    other kind than ``run``'s samples."""
    if os.path.isdir(name):
        check_not_a_run(name, "reference data")
    kind = _kind_of_name(name)
    if kind is not None and kind != ("images" if run.is_image else "vectors"):
        _refuse_kind(name, kind, run)


def vector_reference(name: str, num: int, seed: int) -> np.ndarray:
    """Reference points (N, D) of a vector run: ``num`` draws of a built-in distribution with
    seed ``10000 + seed``, or the points of a .npy/.npz file."""
    if name in TOY_DATASETS:
        return load_vectors(name, num=num, seed=10_000 + seed)
    return load_vectors(name)


def reference_stats(path: str) -> dict | None:
    """Precomputed FID statistics: a ``.npz`` holding ``mu`` (d,) and ``sigma`` (d, d) (the
    layout of ADM's reference batches and of pytorch-fid's stats files, optional ``count``),
    or None when ``path`` is not such a file."""
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return None
    check_numpy_header(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if not {"mu", "sigma"} <= set(f.files):
                return None
            count = int(f["count"]) if "count" in f.files else None
            return {
                "mu": f["mu"].astype(np.float64),
                "sigma": f["sigma"].astype(np.float64),
                "count": count,
            }
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise read_error(path, exc) from None


def image_reference(name: str, run) -> torch.Tensor:
    """Reference images (N, C, H, W) of an image run: the test split of fashion-mnist and
    cifar10, the whole set otherwise; for a latent run, the folder's images cropped as the
    encoded ones were."""
    cfg = run.config
    if run.latents:
        return cropped_images(name, run.sample_shape[-1])  # (n, 3, S, S), as decoded
    same = name == cfg.data
    split = "test" if name in ("fashion-mnist", "cifar10") else "train"
    ref = open_data(name, directory=cfg.data_dir if same else "", size=cfg.image_size, split=split)
    if ref.kind == "vectors":
        _refuse_kind(name, "vectors", run)
    check(
        ref.shape == run.shape,
        f"reference {name!r} holds samples of shape {ref.shape}, the "
        f"run generates {run.shape}; use reference data of the same size",
    )
    if run.num_classes:
        check_same_classes(run.class_names, ref.class_names, f"reference {name!r}")
    assert ref.x is not None  # open_data holds reference images in memory
    return ref.x


def training_images(run, num: int, seed: int) -> torch.Tensor:
    """Images of the run's training set for the floor: the images its latents were encoded
    from, cropped as then (``num`` of them, chosen with ``seed``), or its training split."""
    cfg = run.config
    if run.latents:
        return cropped_images(run.latents["source"], run.sample_shape[-1], num, seed)
    train_data = open_data(cfg.data, directory=cfg.data_dir, size=cfg.image_size)
    assert train_data.x is not None  # open_data holds the images in memory
    return train_data.x


def reference_count(reference) -> int | None:
    """How many reference points or images (a statistics file: its ``count``, if stored)."""
    return reference.get("count") if isinstance(reference, dict) else int(len(reference))


__all__ = [
    "check_reference",
    "vector_reference",
    "reference_stats",
    "image_reference",
    "training_images",
    "reference_count",
]
