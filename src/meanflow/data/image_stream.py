"""A folder of PNG/JPEG images read batch by batch from disk (``--set stream=true``).

:class:`ImageFolderReader` is the streamed twin of
:func:`~meanflow.data.image_folder.load_image_folder`: the same files and labels in the same
order (:func:`~meanflow.data.image_folder.list_image_folder`), the same grey-or-RGB rule, the
same decoding, bicubic resize and scale to [-1, 1], so a streamed run sees bitwise the same
pixels. Opening it
reads only the file list and image headers (mode and size, no pixels): every header while all
are greyscale, up to the first colour image otherwise. A file whose header cannot be read is
reported, like a corrupt file, when a batch first reads it. Without a target size, every image
must have the first one's size; that too is checked as batches read them.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import MeanFlowError, check
from .image_folder import _pillow, image_pixels, list_image_folder, read_image, size_mismatch
from .images import scale_pixels
from .latents import is_latents_dir
from .sources import IMAGE_DATASETS, TrainingSet, _idx_pair
from .toy import TOY_DATASETS


class ImageReadError(MeanFlowError):
    """A :class:`~meanflow.errors.MeanFlowError` met while reading a batch.

    A DataLoader worker's exception is raised again in the training process as
    ``type(exc)("Caught ... Original Traceback ...")``; this type keeps only the original
    one-line message from that text, so the command line still prints one line."""

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _header(path: str) -> tuple[str, tuple[int, int]] | None:
    """``(mode, (width, height))`` from the file's header, or None when it cannot be read."""
    Image, unidentified = _pillow()
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, unidentified, SyntaxError, ValueError):
        return None


class ImageFolderReader:
    """The :class:`~meanflow.data.stream.BatchReader` of an image folder.

    ``batch(indices)`` decodes those files and returns ``(x, y)``: float32 (B, C, H, W) in
    [-1, 1] and int64 labels (None for a flat folder or with ``labelled=False``). ``size``
    resizes every image (bicubic) to size x size; None keeps the first image's size and
    refuses others. Holds only paths and labels, so it pickles into DataLoader workers.
    """

    def __init__(self, directory: str, size: int | None = None, labelled: bool = True) -> None:
        _pillow()
        check(
            size is None or (isinstance(size, int) and size > 0),
            f"size must be a positive integer or None, got {size!r}",
        )
        files, labels, class_names = list_image_folder(directory)
        self.directory, self.files, self.size = directory, files, size
        self.labels = None if labels is None or not labelled else np.asarray(labels, np.int64)
        self.class_names = class_names if self.labels is not None else None
        headers = []
        for path in files:  # greyscale unless some image is not: stop at the first colour one
            header = _header(path)
            if header is not None:
                headers.append((path, header))
                if header[0] not in ("1", "L", "LA"):
                    break
        check(
            bool(headers),
            f"image folder {directory!r}: no image header could be read "
            f"(first file {files[0]}); the files are corrupt or not PNG/JPEG",
        )
        self.gray = all(mode in ("1", "L", "LA") for _, (mode, _) in headers)
        self.first_path, self.first_size = headers[0][0], headers[0][1][1]

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"ImageFolderReader({self.directory!r}, {len(self)} images, shape={self.sample_shape})"
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as read."""
        width, height = (self.size, self.size) if self.size else self.first_size
        return (1 if self.gray else 3, height, width)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        arrays = []
        for i in indices.tolist():
            path = self.files[i]
            try:
                image, _ = read_image(path)
            except MeanFlowError as exc:
                raise ImageReadError(str(exc)) from None
            if self.size is None and image.size != self.first_size:
                raise ImageReadError(
                    str(size_mismatch(self.first_path, self.first_size, path, image.size))
                )
            arrays.append(image_pixels(image, self.gray, self.size))
        x = scale_pixels(np.stack(arrays), 255.0)
        y = None if self.labels is None else torch.from_numpy(self.labels[indices])
        return x, y


def is_image_folder(name: str) -> bool:
    """True when ``--data name`` resolves to a folder of images (not a built-in data set
    name, a folder of IDX files, CIFAR-10 batches or latents)."""
    if name in TOY_DATASETS or name in IMAGE_DATASETS or not os.path.isdir(name):
        return False
    if is_latents_dir(name) or _idx_pair(name, "train") is not None:
        return False
    return not any(
        os.path.isfile(os.path.join(name, n)) for n in ("data_batch_1.bin", "test_batch.bin")
    )


def open_image_stream(directory: str, size: int = 0, labelled: bool = True) -> TrainingSet:
    """An image folder as a streamed :class:`~meanflow.data.sources.TrainingSet` (``x`` None,
    pixels read by an :class:`ImageFolderReader`); ``size`` 0 keeps the native size."""
    reader = ImageFolderReader(directory, size or None, labelled)
    labels = None if reader.labels is None else torch.from_numpy(reader.labels)
    return TrainingSet(
        None,
        labels,
        reader.class_names,
        "images",
        directory,
        reader=reader,
        sample_shape=reader.sample_shape,
    )


__all__ = ["ImageFolderReader", "ImageReadError", "is_image_folder", "open_image_stream"]
