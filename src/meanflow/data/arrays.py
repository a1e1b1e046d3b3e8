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

from ..errors import MeanFlowError, check


def load_array(path: str, ndims: tuple[int, ...] = (2,), with_labels: bool = False):
    """Load and validate an array from ``path`` with one of ``ndims`` dimensions; return it as
    float32, and with ``with_labels`` also the ``.npz``'s labels (int64 or None)."""
    check(os.path.isfile(path), f"data file {path!r} does not exist; give a built-in dataset "
          "name or the path of a .npy/.npz file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                check(len(keys) > 0, f"{path}: the .npz archive holds no arrays")
                key = keys[0] if len(keys) == 1 else next(
                    (k for k in ("x", "data") if k in keys), None)
                check(key is not None, f"{path}: the .npz holds {keys}; name the data array "
                      "'x' (or 'data') or save a single array")
                array = archive[key]
                label_key = next((k for k in ("y", "labels") if k in keys and k != key), None)
                labels = archive[label_key] if label_key else None
        elif path.endswith(".npy"):
            array, labels = np.load(path, allow_pickle=False), None
        else:
            raise MeanFlowError(f"{path}: unsupported data file type; use .npy or .npz")
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, MeanFlowError):
            raise
        raise MeanFlowError(f"{path}: cannot read the array ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt file'})") from exc
    array = validate_array(array, path, ndims)
    if not with_labels:
        return array
    if labels is not None:
        labels = _validate_labels(labels, len(array), path)
    return array, labels


def _validate_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    check(labels.shape == (n,), f"{name}: labels must have shape ({n},), got {labels.shape}")
    check(np.issubdtype(labels.dtype, np.integer), f"{name}: labels must be integers, got "
          f"dtype {labels.dtype}")
    check(int(labels.min()) >= 0, f"{name}: labels must be >= 0, got {int(labels.min())}")
    return labels.astype(np.int64)


def validate_array(array: np.ndarray, name: str = "data",
                   ndims: tuple[int, ...] = (2,)) -> np.ndarray:
    """Check the shape ((N, D), or (N, C, H, W) when 4 is in ``ndims``) with no zero size, a
    real numeric dtype and finite values."""
    want = " or ".join({2: "(N, D)", 4: "(N, C, H, W)"}[n] for n in ndims)
    check(array.ndim in ndims, f"{name}: expected an array of shape {want}, got shape "
          f"{array.shape}")
    check(array.shape[0] > 0, f"{name}: the array is empty (N = 0)")
    check(all(s > 0 for s in array.shape[1:]), f"{name}: the array has no features "
          f"(shape {array.shape})")
    check(np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer),
          f"{name}: expected real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        rows = int(bad.reshape(len(bad), -1).any(axis=1).sum())
        raise MeanFlowError(f"{name}: {rows} rows hold NaN or Inf "
                            f"(first at row {row}); clean the data before training")
    return array
