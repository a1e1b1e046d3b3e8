"""Folders of PNG/JPEG images: one sub-folder per class (labels in sorted folder order) or
images directly inside (unlabelled), read with Pillow into an
:class:`~meanflow.data.images.ImageDataset` (``pip install 'meanflow[images]'``). The streamed
reader (:mod:`.image_stream`) uses the same listing, decoding and grey-or-RGB rule.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import MeanFlowError, check
from .images import IMAGE_EXTENSIONS, ImageDataset, _dataset

__all__ = ["load_image_folder", "list_image_folder", "read_image", "image_pixels"]


def _image_files(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if n.lower().endswith(IMAGE_EXTENSIONS)
        and not n.startswith(".")
        and os.path.isfile(os.path.join(folder, n))
    )


def list_image_folder(directory: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """``(files, labels, class_names)`` of an image folder in a fixed order: flat (labels None)
    or one sub-folder per class, classes in sorted order, files sorted within each. The layout
    rules of :func:`load_image_folder`, shared by the streamed reader and latent encoding."""
    check(os.path.isdir(directory), f"image folder {directory!r} does not exist; check the path")
    entries = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    check(
        len(entries) > 0,
        f"image folder {directory!r} is empty; put PNG/JPEG files in it "
        "(or one sub-folder of them per class)",
    )
    flat = _image_files(directory)
    classes = [n for n in entries if os.path.isdir(os.path.join(directory, n))]
    if flat or not classes:
        check(
            len(flat) > 0,
            f"image folder {directory!r} holds no PNG/JPEG files (found "
            f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); add images",
        )
        check(
            not classes,
            f"image folder {directory!r} mixes loose images with sub-folders "
            f"({classes[0] if classes else ''}); use one layout: flat, or one folder per class",
        )
        return flat, None, None
    files, labels = [], []
    for index, name in enumerate(classes):
        found = _image_files(os.path.join(directory, name))
        check(
            len(found) > 0,
            f"class folder {os.path.join(directory, name)!r} holds no "
            "PNG/JPEG files; add images or remove the folder",
        )
        files += found
        labels += [index] * len(found)
    return files, labels, classes


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MeanFlowError(
            "image folders need Pillow; run `pip install 'meanflow[images]'`"
        ) from None
    return Image, UnidentifiedImageError


def read_image(path: str):
    """``(image, gray)``: the decoded file as a Pillow image in mode ``L`` when it is grayscale
    (modes 1, L, LA) else ``RGB`` (alpha dropped, palettes expanded); one clear error when the
    file cannot be decoded."""
    Image, UnidentifiedImageError = _pillow()
    try:
        with Image.open(path) as image:
            image.load()
            gray = image.mode in ("1", "L", "LA")
            return image.convert("L" if gray else "RGB"), gray
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise MeanFlowError(
            f"{path}: cannot read the image ({exc.__class__.__name__}); it "
            "is corrupt or not a PNG/JPEG, fix or remove it"
        ) from None


def image_pixels(image, all_gray: bool, size: int | None) -> np.ndarray:
    """uint8 (C, H, W) pixels of an image from :func:`read_image`: RGB unless the whole folder
    is grayscale, resized (bicubic) to size x size when ``size`` is given."""
    Image, _ = _pillow()
    if not all_gray and image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), getattr(Image, "Resampling", Image).BICUBIC)
    array = np.asarray(image, np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def size_mismatch(first_path: str, first_size, path: str, size) -> MeanFlowError:
    """The error for a folder of images of different sizes loaded without a target size."""
    return MeanFlowError(
        f"images differ in size: {first_path} is {first_size[0]}x{first_size[1]} but "
        f"{path} is {size[0]}x{size[1]} (width x height); pass --image-size S "
        "(Python: size=S) to resize them all to S x S"
    )


def load_image_folder(directory: str, size: int | None = None) -> ImageDataset:
    """Load PNG/JPEG files from ``directory``: either all directly inside it (unlabelled) or in
    one sub-folder per class (labels follow the sorted folder names). Images become 1-channel
    when every one is grayscale, RGB otherwise (alpha is dropped, palettes expanded). With
    ``size``, each is resized (bicubic) to size x size; without it all must share one size.
    (:class:`~meanflow.data.image_stream.ImageFolderReader` reads the same pixels batch by
    batch without loading the folder.)"""
    _pillow()
    check(
        size is None or (isinstance(size, int) and size > 0),
        f"size must be a positive integer or None, got {size!r}",
    )
    files, labels, class_names = list_image_folder(directory)
    loaded = [(path, *read_image(path)) for path in files]
    all_gray = all(gray for _, _, gray in loaded)
    arrays = []
    first_path, first_size = loaded[0][0], loaded[0][1].size
    for path, image, _ in loaded:
        if size is None and image.size != first_size:
            raise size_mismatch(first_path, first_size, path, image.size)
        arrays.append(image_pixels(image, all_gray, size))
    return _dataset(np.stack(arrays), 255.0, labels, class_names, directory)
