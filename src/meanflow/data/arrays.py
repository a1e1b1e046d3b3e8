"""User arrays: a ``.npy`` or ``.npz`` file holding one (N, D) real-valued array, or an
(N, C, H, W) one (e.g. VAE latents) where the caller allows it.

Files are read with ``allow_pickle=False``: loading data never executes code. An ``.npz``
with several arrays must name the data ``x`` (or ``data``); its integer class labels, if any,
are ``y`` (or ``labels``), shape (N,), values 0..K-1.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..errors import MeanFlowError, check, plural

NPY_MAGIC = b"\x93NUMPY"


def not_numeric(path: str, why: str) -> MeanFlowError:
    """The error for a file that is not a .npy/.npz of numbers, saying ``why``."""
    return MeanFlowError(
        f"{path} is not a NumPy array file of numbers (.npy/.npz written by "
        f"numpy.save/savez); {why}; pickled objects are never loaded"
    )


def check_numpy_header(path: str) -> None:
    """Raise :func:`not_numeric` unless ``path`` starts like a .npy file (or, for ``.npz``, a zip
    archive), so text and pickles never reach numpy's loader."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK" if path.endswith(".npz") else NPY_MAGIC):
        return
    if not head:
        raise not_numeric(path, "the file is empty")
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if b"\0" not in head and printable >= 0.9 * len(head):
        first = head.decode("ascii", "replace").strip().splitlines()[0][:20]
        raise not_numeric(
            path,
            f"it holds text starting {first!r} (convert a text table with "
            "numpy.loadtxt and numpy.save)",
        )
    raise not_numeric(
        path,
        "it is not a zip archive"
        if path.endswith(".npz")
        else "it does not start with the .npy header",
    )


def read_error(path: str, exc: Exception) -> MeanFlowError:
    """A one-line error for ``exc`` raised while numpy read ``path``."""
    text = (str(exc).splitlines() or [""])[0][:200]
    if "allow_pickle" in text or "pickled" in text:
        return not_numeric(path, "it holds Python objects (dtype object)")
    if isinstance(exc, zipfile.BadZipFile):
        return not_numeric(path, f"its zip archive is damaged (BadZipFile: {text})")
    return MeanFlowError(
        f"{path}: cannot read the array ({exc.__class__.__name__}: {text or 'corrupt file'})"
    )


def _member(archive, key: str, path: str) -> np.ndarray:
    value = archive[key]
    if not isinstance(value, np.ndarray):  # numpy returns non-.npy members as raw bytes
        raise not_numeric(path, f"its member {key!r} is not a .npy array")
    return value


def load_array(path: str, ndims: tuple[int, ...] = (2,), with_labels: bool = False):
    """Load and validate an array from ``path`` with one of ``ndims`` dimensions; return it as
    float32, and with ``with_labels`` also the ``.npz``'s labels (int64 or None)."""
    check(
        os.path.isfile(path),
        f"data file {path!r} does not exist; give a built-in dataset "
        "name or the path of a .npy/.npz file",
    )
    check(path.endswith((".npy", ".npz")), f"{path}: unsupported data file type; use .npy or .npz")
    check_numpy_header(path)
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                check(len(keys) > 0, f"{path}: the .npz archive holds no arrays")
                key = (
                    keys[0]
                    if len(keys) == 1
                    else next((k for k in ("x", "data") if k in keys), None)
                )
                check(
                    key is not None,
                    f"{path}: the .npz holds {keys}; name the data array "
                    "'x' (or 'data') or save a single array",
                )
                assert key is not None  # check() raised otherwise
                array = _member(archive, key, path)
                label_key = next((k for k in ("y", "labels") if k in keys and k != key), None)
                labels = _member(archive, label_key, path) if label_key else None
        else:
            array, labels = np.load(path, allow_pickle=False), None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, MeanFlowError):
            raise
        raise read_error(path, exc) from None
    array = validate_array(array, path, ndims)
    if not with_labels:
        return array
    if labels is not None:
        labels = _validate_labels(labels, len(array), path)
    return array, labels


def _validate_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    check(labels.shape == (n,), f"{name}: labels must have shape ({n},), got {labels.shape}")
    check(
        np.issubdtype(labels.dtype, np.integer),
        f"{name}: labels must be integers, got dtype {labels.dtype}",
    )
    check(int(labels.min()) >= 0, f"{name}: labels must be >= 0, got {int(labels.min())}")
    return labels.astype(np.int64)


def validate_array(
    array: np.ndarray, name: str = "data", ndims: tuple[int, ...] = (2,)
) -> np.ndarray:
    """Check the shape ((N, D), or (N, C, H, W) when 4 is in ``ndims``) with no zero size, a
    real numeric dtype and finite values."""
    want = " or ".join({2: "(N, D)", 4: "(N, C, H, W)"}[n] for n in ndims)
    check(
        array.ndim in ndims, f"{name}: expected an array of shape {want}, got shape {array.shape}"
    )
    check(array.shape[0] > 0, f"{name}: the array is empty (N = 0)")
    check(
        all(s > 0 for s in array.shape[1:]),
        f"{name}: the array has no features (shape {array.shape})",
    )
    check(
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer),
        f"{name}: expected real numbers, got dtype {array.dtype}",
    )
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        rows = int(bad.reshape(len(bad), -1).any(axis=1).sum())
        hold = "hold" if rows != 1 else "holds"
        raise MeanFlowError(
            f"{name}: {plural(rows, 'row')} {hold} NaN or Inf (first at row "
            f"{row}); clean the data before training"
        )
    return array
