"""Sample files written in bounded memory: streamed ``.npy`` and the ADM evaluator's ``.npz``
(uint8 images ``arr_0``, labels ``arr_1``), and the rows each rank of a sharded run samples."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from typing import IO

import numpy as np

from ..errors import check
from .noise import NOISE_CHUNK

# Rows per block when reading part files back.
READ_BLOCK = 256


def rank_rows(num: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``num`` that ``rank`` of ``world`` samples: a contiguous range
    of whole noise chunks, as even as chunks allow (lower ranks take the spare ones, so rank 0
    always has rows); the ranges of ranks 0..world-1 in order cover ``0..num``."""
    base, extra = divmod(-(-num // NOISE_CHUNK), world)
    k0 = rank * base + min(rank, extra)
    k1 = k0 + base + (rank < extra)
    return min(num, k0 * NOISE_CHUNK), min(num, k1 * NOISE_CHUNK)


def write_npy(f: IO[bytes], shape: tuple[int, ...], dtype, blocks: Iterable[np.ndarray]) -> None:
    """Write an .npy array of ``shape`` and ``dtype`` to the open file ``f`` from ``blocks``
    of rows, holding one block at a time; the bytes are those of ``np.save`` of the whole."""
    dtype = np.dtype(dtype)
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": tuple(int(s) for s in shape),
    }
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header over 64 KiB
        np.lib.format.write_array_header_2_0(f, header)
    rows = 0
    for block in blocks:
        check(
            block.shape[1:] == tuple(shape[1:]) and block.dtype == dtype,
            f"a block of shape {block.shape} {block.dtype} does not fit an array of "
            f"{tuple(shape)} {dtype}",
        )
        f.write(np.ascontiguousarray(block).tobytes())
        rows += len(block)
    check(rows == shape[0], f"wrote {rows} rows of {shape[0]}")


def write_npz(
    path: str, images: Iterable[np.ndarray], shape: tuple[int, ...], labels: np.ndarray | None
) -> None:
    """Write the ADM evaluator's .npz: ``arr_0`` uint8 images of ``shape`` (N, H, W, C) from
    the blocks ``images``, streamed into the zip, and ``arr_1`` int64 ``labels`` if given."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            write_npy(f, shape, np.uint8, images)
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))


def read_blocks(paths: list[str], bar=None) -> Iterator[np.ndarray]:
    """The rows of the .npy files ``paths`` in order, :data:`READ_BLOCK` rows at a time."""
    for path in paths:
        array = np.load(path, mmap_mode="r")
        for i in range(0, len(array), READ_BLOCK):
            block = np.array(array[i : i + READ_BLOCK])
            if bar is not None:
                bar.update(len(block))
            yield block
        del array
