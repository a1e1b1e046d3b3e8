"""User arrays: a ``.npy`` or ``.npz`` file holding one (N, D) real-valued array.

Files are read with ``allow_pickle=False``: loading data never executes code. An ``.npz``
with several arrays must name the data ``x`` (or ``data``).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..errors import MeanFlowError, check


def load_array(path: str) -> np.ndarray:
    """Load and validate an (N, D) array from ``path``; return it as float32."""
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
        elif path.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            raise MeanFlowError(f"{path}: unsupported data file type; use .npy or .npz")
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, MeanFlowError):
            raise
        raise MeanFlowError(f"{path}: cannot read the array ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt file'})") from exc
    return validate_array(array, path)


def validate_array(array: np.ndarray, name: str = "data") -> np.ndarray:
    """Check shape (N, D) with N, D > 0, a real numeric dtype and finite values."""
    check(array.ndim == 2, f"{name}: expected an array of shape (N, D), got shape {array.shape}")
    check(array.shape[0] > 0, f"{name}: the array is empty (N = 0)")
    check(array.shape[1] > 0, f"{name}: the array has no features (D = 0)")
    check(np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer),
          f"{name}: expected real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise MeanFlowError(f"{name}: {int(bad.any(axis=1).sum())} rows hold NaN or Inf "
                            f"(first at row {row}); clean the data before training")
    return array
