"""Data sources: built-in 2-D distributions, image datasets, folders and user arrays, resolved
from one string by :func:`open_data` (see sources.py); streamed readers (stream.py,
image_stream.py), VAE latents (latents.py, encode.py, vae.py) and EDM's augmentation.

Layer: imports ``meanflow.runtime`` and ``meanflow.errors`` only.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import MeanFlowError
from .arrays import load_array, validate_array
from .image_folder import load_image_folder
from .images import (
    ImageDataset,
    load_cifar10_binary,
    load_digits,
    load_fashion_mnist,
    load_idx,
)
from .sources import IMAGE_DATASETS, TrainingSet, check_same_classes, open_data
from .toy import TOY_DATASETS


def load_vectors(name_or_path: str, num: int = 100_000, seed: int = 0) -> np.ndarray:
    """Return an (N, D) float32 array: ``num`` draws of a built-in distribution (seeded), or the
    contents of a ``.npy`` / ``.npz`` file."""
    if name_or_path in TOY_DATASETS:
        return TOY_DATASETS[name_or_path](num, np.random.default_rng(seed))
    if os.path.splitext(name_or_path)[1] in (".npy", ".npz") or os.path.exists(name_or_path):
        return load_array(name_or_path)
    import difflib

    close = difflib.get_close_matches(name_or_path, list(TOY_DATASETS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise MeanFlowError(
        f"unknown dataset {name_or_path!r}: {hint}use one of "
        f"{', '.join(TOY_DATASETS)} or a path to a .npy/.npz file"
    )


__all__ = [
    "TOY_DATASETS",
    "IMAGE_DATASETS",
    "TrainingSet",
    "open_data",
    "check_same_classes",
    "load_vectors",
    "load_array",
    "validate_array",
    "ImageDataset",
    "load_idx",
    "load_fashion_mnist",
    "load_digits",
    "load_cifar10_binary",
    "load_image_folder",
]
