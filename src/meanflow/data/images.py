"""Image datasets: IDX (MNIST / Fashion-MNIST), scikit-learn digits, CIFAR-10 (binary version)
and folders of PNG/JPEG files.

Every loader returns an :class:`ImageDataset` whose ``images`` are a float32 tensor of shape
(N, C, H, W) scaled to [-1, 1] (pixel 0 -> -1, the top value -> 1). Nothing here unpickles:
IDX and CIFAR files are parsed with numpy from raw bytes, so loading data never executes code.
Pillow and scikit-learn are optional (``pip install 'meanflow[images]'``).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MeanFlowError, check, plural

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
# Where the Debian package ``dataset-fashion-mnist`` (and common manual installs) put the files.
FASHION_MNIST_DIRS = [
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/data/fashion-mnist",
    "/usr/local/share/fashion-mnist",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_CIFAR_RECORD = 1 + 3 * 32 * 32


@dataclass
class ImageDataset:
    """Images (N, C, H, W) float32 in [-1, 1]; labels (N,) int64 or None; where they came from."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def scale_pixels(pixels: np.ndarray, top: float = 255.0) -> torch.Tensor:
    """(N, C, H, W) pixels in [0, top] as a float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) * (2.0 / top) - 1.0)


def _dataset(pixels: np.ndarray, top: float, labels, class_names, source) -> ImageDataset:
    """Scale (N, C, H, W) pixels in [0, top] to float32 [-1, 1] and wrap them."""
    images = scale_pixels(pixels, top)
    label_tensor = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64))
    return ImageDataset(images, label_tensor, class_names, source)


def _read_bytes(path: str) -> bytes:
    """The contents of ``path``; gunzipped when it is gzip-compressed (by name or by magic)."""
    check(os.path.isfile(path), f"file {path!r} does not exist; check the path")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if path.endswith(".gz") or raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as exc:
        raise MeanFlowError(
            f"{path}: cannot read the file ({exc.__class__.__name__}); it is "
            "corrupt or truncated, download it again"
        ) from None


def _parse_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """Parse one uint8 IDX file with the expected ``magic`` and return its ``ndim``-D array."""
    raw = _read_bytes(path)
    kind = "images" if magic == _IDX_IMAGES else "labels"
    header = 4 + 4 * ndim
    check(
        len(raw) >= header,
        f"{path}: {plural(len(raw), 'byte')} is too short for an IDX "
        f"{kind} header ({header} bytes); the file is truncated or not an IDX file",
    )
    found = int.from_bytes(raw[:4], "big")
    check(
        found == magic,
        f"{path}: IDX magic number is 0x{found:08x}, expected 0x{magic:08x} "
        f"(uint8 {kind}); the file is corrupt or not an IDX {kind} file",
    )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    check(
        all(d > 0 for d in dims),
        f"{path}: IDX header declares shape {dims}; every dimension must be positive",
    )
    expected = header + int(np.prod(dims))
    check(
        len(raw) == expected,
        f"{path}: header declares shape {dims} ({expected} bytes) but "
        f"the file holds {plural(len(raw), 'byte')}; it is truncated or corrupt, download it "
        "again",
    )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_idx(images_path: str, labels_path: str | None = None) -> ImageDataset:
    """Load uint8 IDX images (magic 0x00000803, N x rows x cols) and optional IDX labels
    (0x00000801); either file may be gzip-compressed. Returns 1-channel images in [-1, 1]."""
    pixels = _parse_idx(images_path, _IDX_IMAGES, 3)
    labels = None
    if labels_path is not None:
        labels = _parse_idx(labels_path, _IDX_LABELS, 1)
        check(
            len(labels) == len(pixels),
            f"{labels_path}: holds {plural(len(labels), 'label')} "
            f"but {images_path} holds {plural(len(pixels), 'image')}; pair files from the "
            "same split",
        )
    return _dataset(pixels[:, None], 255.0, labels, None, images_path)


def _dpkg_dirs(package: str) -> list[str]:
    """Directories holding files of an installed Debian package; [] without dpkg or package."""
    try:
        result = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    return sorted(
        {
            os.path.dirname(line.strip())
            for line in result.stdout.splitlines()
            if "idx" in os.path.basename(line)
        }
    )


def _find(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_fashion_mnist(directory: str | None = None, split: str = "train") -> ImageDataset:
    """Load Fashion-MNIST (N, 1, 28, 28) from the four standard IDX files (plain or ``.gz``) in
    ``directory``; when it is None, search where ``apt-get install dataset-fashion-mnist``
    puts them (:data:`FASHION_MNIST_DIRS` and the package's own file list)."""
    check(split in ("train", "test"), f"unknown split {split!r}; use 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if directory is not None:
        check(
            os.path.isdir(directory),
            f"Fashion-MNIST directory {directory!r} does not exist; "
            "pass the folder holding the IDX files",
        )
        candidates = [directory]
    else:
        candidates = list(FASHION_MNIST_DIRS) + _dpkg_dirs("dataset-fashion-mnist")
    for folder in candidates:
        images, labels = (_find(folder, name) for name in names)
        if images and labels:
            data = load_idx(images, labels)
            assert data.labels is not None  # load_idx was given a labels file
            check(
                int(data.labels.max()) < 10,
                f"{labels}: labels go up to "
                f"{int(data.labels.max())}, Fashion-MNIST has 10 classes (0-9)",
            )
            data.class_names = list(FASHION_MNIST_CLASSES)
            return data
    where = repr(directory) if directory is not None else "the system data directories"
    raise MeanFlowError(
        f"Fashion-MNIST {split} files ({names[0]}[.gz], {names[1]}[.gz]) not "
        f"found in {where}; run `apt-get install dataset-fashion-mnist` or pass "
        "directory= a folder holding them"
    )


def load_digits(size: int = 16) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16, labels 0-9) as
    (1797, 1, size, size) in [-1, 1]. ``size`` 8, 16 or 32: each pixel is repeated into a
    (size/8 x size/8) block (nearest-neighbour, exact, no interpolation)."""
    check(size in (8, 16, 32), f"digits size {size!r} is not supported; use 8, 16 or 32")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise MeanFlowError(
            "the digits dataset needs scikit-learn; run `pip install 'meanflow[images]'`"
        ) from None
    bunch = sklearn_digits()
    factor = size // 8
    pixels = np.asarray(bunch.images, np.float32)
    pixels = pixels.repeat(factor, axis=1).repeat(factor, axis=2)[:, None]
    return _dataset(pixels, 16.0, bunch.target, [str(d) for d in range(10)], "sklearn:digits")


def load_cifar10_binary(directory: str, split: str = "train") -> ImageDataset:
    """Load CIFAR-10 (N, 3, 32, 32) from the official *binary* version: ``data_batch_1.bin`` ..
    ``data_batch_5.bin`` (train) or ``test_batch.bin`` (test); each record is one label byte and
    3072 pixel bytes (red, green, blue planes, rows of 32). Class names come from
    ``batches.meta.txt`` when present. The pickled python version is refused."""
    check(split in ("train", "test"), f"unknown split {split!r}; use 'train' or 'test'")
    check(
        os.path.isdir(directory),
        f"CIFAR-10 directory {directory!r} does not exist; pass the "
        "cifar-10-batches-bin folder of the binary version",
    )
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        pickled = any(os.path.isfile(os.path.join(directory, n[:-4])) for n in names)
        check(
            not pickled,
            f"{directory} holds the pickled python version of CIFAR-10, which is "
            "refused because unpickling can execute code; download the binary version "
            "(cifar-10-binary.tar.gz) instead",
        )
        raise MeanFlowError(
            f"{directory}: missing {', '.join(missing)}; pass the "
            "cifar-10-batches-bin folder of the CIFAR-10 binary version"
        )
    records = []
    for name in names:
        path = os.path.join(directory, name)
        raw = _read_bytes(path)
        check(
            len(raw) > 0 and len(raw) % _CIFAR_RECORD == 0,
            f"{path}: "
            f"{plural(len(raw), 'byte')} is not a whole number of {_CIFAR_RECORD}-byte "
            "records; the file is truncated or corrupt, download it again",
        )
        block = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
        check(
            int(block[:, 0].max()) < 10,
            f"{path}: label byte {int(block[:, 0].max())} is "
            "not a CIFAR-10 class (0-9); the file is corrupt or not CIFAR-10",
        )
        records.append(block)
    block = np.concatenate(records)
    class_names = list(CIFAR10_CLASSES)
    meta = os.path.join(directory, "batches.meta.txt")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
        if len(lines) == 10:
            class_names = lines
    pixels = block[:, 1:].reshape(-1, 3, 32, 32)
    return _dataset(pixels, 255.0, block[:, 0], class_names, directory)


__all__ = [
    "ImageDataset",
    "load_idx",
    "load_fashion_mnist",
    "load_digits",
    "load_cifar10_binary",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_DIRS",
]
