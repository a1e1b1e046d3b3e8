"""One string names the training data: a built-in 2-D distribution, an image dataset, a folder
or an array file. :func:`open_data` resolves it to a :class:`TrainingSet`.

=================  ========================================================================
``--data``         what is loaded
=================  ========================================================================
checkerboard ...   ``num`` seeded draws of a built-in 2-D distribution (vectors)
fashion-mnist      IDX files of the Debian package ``dataset-fashion-mnist``, or of the
                   folder given as ``directory`` (``--data-dir``); 10 labelled classes
digits             scikit-learn's bundled 8x8 digits, repeated to ``size`` (default 16)
cifar10            the binary version (``data_batch_*.bin``) in ``directory``
DIR                a folder: IDX files (Fashion-MNIST layout), CIFAR-10 binary batches, or
                   PNG/JPEG images (flat, or one sub-folder per class), resized to ``size``
FILE.npy/.npz      (N, D) vectors, or (N, C, H, W) arrays such as VAE latents; an ``.npz``
                   may hold labels ``y`` (N,) beside the data ``x``
=================  ========================================================================

``kind`` is ``"vectors"`` (N, D), ``"images"`` ((N, C, H, W) pixels already in [-1, 1]) or
``"arrays"`` ((N, C, H, W) values of any scale, standardized per channel by the trainer).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import MeanFlowError, check
from .arrays import load_array
from .image_folder import load_image_folder
from .images import load_cifar10_binary, load_digits, load_fashion_mnist, load_idx
from .toy import TOY_DATASETS

if TYPE_CHECKING:
    from .stream import BatchReader

IMAGE_DATASETS = ("fashion-mnist", "digits", "cifar10")


@dataclass
class TrainingSet:
    """Samples ``x`` (float32), optional labels (N,) int64 with their class names.

    A streamed set (``kind`` ``"latents"``, or images read from disk) has ``x = None``, a
    ``reader`` that reads batches by index (:class:`~meanflow.data.stream.BatchReader`) and
    the shape of one sample in ``sample_shape``; ``latents`` holds a latent set's VAE facts
    (``scaling_factor``, ``shift_factor``, ``vae``, ``flips``)."""

    x: torch.Tensor | None
    labels: torch.Tensor | None
    class_names: list[str] | None
    kind: str
    source: str
    reader: BatchReader | None = None
    sample_shape: tuple[int, ...] = ()
    latents: dict | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample: (D,) or (C, H, W)."""
        if self.x is None:
            return tuple(self.sample_shape)
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        assert self.class_names is not None  # labelled sets always name their classes
        return len(self.class_names)

    @property
    def streamed(self) -> bool:
        return self.x is None

    def __len__(self) -> int:
        if self.x is None:
            assert self.reader is not None  # a streamed set always has a reader
            return len(self.reader)
        return int(self.x.shape[0])


def _from_images(data, kind: str = "images") -> TrainingSet:
    return TrainingSet(data.images, data.labels, data.class_names, kind, data.source)


def _idx_pair(directory: str, split: str) -> tuple[str, str] | None:
    prefix = "train" if split == "train" else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = next(
            (
                os.path.join(directory, stem + ext)
                for ext in ("", ".gz")
                if os.path.isfile(os.path.join(directory, stem + ext))
            ),
            None,
        )
        found.append(path)
    images, labels = found
    return (images, labels) if images and labels else None


def _open_directory(directory: str, size: int, split: str) -> TrainingSet:
    pair = _idx_pair(directory, split)
    if pair is not None:
        data = load_idx(*pair)
        assert data.labels is not None  # load_idx was given a labels file
        data.class_names = [str(i) for i in range(int(data.labels.max()) + 1)]
        return _from_images(data)
    if os.path.isfile(os.path.join(directory, "data_batch_1.bin")) or os.path.isfile(
        os.path.join(directory, "test_batch.bin")
    ):
        return _from_images(load_cifar10_binary(directory, split))
    return _from_images(load_image_folder(directory, size or None))


def _open_array(path: str) -> TrainingSet:
    array, labels = load_array(path, ndims=(2, 4), with_labels=True)
    x = torch.from_numpy(array)
    names = None
    if labels is not None:
        names = [str(i) for i in range(int(labels.max()) + 1)]
        labels = torch.from_numpy(labels)
    return TrainingSet(x, labels, names, "vectors" if x.dim() == 2 else "arrays", path)


def open_data(
    name: str,
    *,
    directory: str = "",
    size: int = 0,
    num: int = 100_000,
    seed: int = 0,
    split: str = "train",
) -> TrainingSet:
    """Resolve ``name`` (see the module docstring). ``directory`` locates fashion-mnist or
    cifar10 files; ``size`` resizes folder images (and sets the digits size); ``num`` and
    ``seed`` apply to the built-in 2-D distributions; ``split`` is ``train`` or ``test``."""
    check(split in ("train", "test"), f"unknown split {split!r}; use 'train' or 'test'")
    check(size >= 0, f"image size must be >= 0 (0: native), got {size}")
    if name in TOY_DATASETS:
        x = TOY_DATASETS[name](num, np.random.default_rng(seed))
        return TrainingSet(torch.from_numpy(x), None, None, "vectors", name)
    if name == "fashion-mnist":
        return _from_images(load_fashion_mnist(directory or None, split))
    if name == "digits":
        return _from_images(load_digits(size or 16))
    if name == "cifar10":
        check(
            bool(directory),
            "--data cifar10 needs --data-dir: the cifar-10-batches-bin folder "
            "of the CIFAR-10 binary version",
        )
        return _from_images(load_cifar10_binary(directory, split))
    if os.path.isdir(name):
        check_not_a_run(name, "data")
        return _open_directory(name, size, split)
    if os.path.splitext(name)[1] in (".npy", ".npz") or os.path.exists(name):
        return _open_array(name)
    known = list(TOY_DATASETS) + list(IMAGE_DATASETS)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise MeanFlowError(
        f"unknown dataset {name!r}: {hint}use one of {', '.join(known)}, a "
        "folder of images, or a .npy/.npz file"
    )


def run_folder(path: str) -> str | None:
    """What ``meanflow`` wrote at ``path``, if anything: ``"run directory"`` (``config.json``
    and ``checkpoints/``, from ``meanflow train``), ``"exported model"`` (``config.json`` and
    ``model.safetensors``, from ``meanflow export``) or None."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "run directory"
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "exported model"
    return None


def _trained_on(path: str) -> str | None:
    """The ``data`` a run directory's ``config.json`` names (None when unreadable)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, str):  # an exported model nests the training config
        inner = config.get("train_config") if isinstance(config, dict) else None
        data = inner.get("data") if isinstance(inner, dict) else None
    return data if isinstance(data, str) and data else None


def check_not_a_run(path: str, role: str) -> None:
    """Refuse a run directory or exported model given where data is expected (``role``:
    ``"data"`` for training, ``"reference data"`` for evaluation), naming the data it was
    trained on."""
    what = run_folder(path)
    if what is None:
        return
    data = _trained_on(path)
    trained = f" (it was trained on {data!r})" if data else ""
    if role == "data":
        hint = "give the data to train on" + (f", e.g. --data {data}" if data else "")
        if what == "run directory":
            hint += f"; to continue that run use --out {path} --resume"
    else:
        hint = "give the data to compare the samples with" + (f", e.g. {data!r}" if data else "")
    article = "an" if what[0] in "aeiou" else "a"
    raise MeanFlowError(f"{path!r} is {article} {what}, not {role}{trained}; {hint}")


def check_same_classes(trained: list[str] | None, other: list[str] | None, what: str) -> None:
    """Refuse comparing a class-conditional run with data whose classes differ."""
    if trained is None or other is None:
        return
    check(
        list(trained) == list(other),
        f"the classes of {what} ({', '.join(other[:5])}"
        f"{', ...' if len(other) > 5 else ''}) differ from the run's ({', '.join(trained[:5])}"
        f"{', ...' if len(trained) > 5 else ''}); use data with the same class folders",
    )
