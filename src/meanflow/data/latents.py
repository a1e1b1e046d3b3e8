"""VAE latents on disk: the ``meanflow-latents`` format, its memory-mapped reader
:class:`LatentShards`, and :func:`draw_latents`, the posterior sample of a training step.

A latents directory (written by ``meanflow latents encode``) holds ``latents.json`` and shards:

- ``moments-KKKKK.npy``: a plain .npy of shape (n, F, 2, C, H, W), float32 or float16;
  ``[:, f, 0]`` is the posterior mean and ``[:, f, 1]`` its std, f = 0 the image and f = 1 its
  horizontal mirror (F = 2 when encoded with ``--flip``; F = 1 by default, as the MeanFlow
  authors encode);
- ``labels-KKKKK.npy``: (n,) int64 class indices (absent for an unlabelled, flat folder).

``latents.json`` = {"format": "meanflow-latents", "version": 1, "count": N, "shape": [C, H, W],
"flips": F, "dtype", "scaling_factor", "shift_factor" (or null), "vae" (absolute folder),
"image_size", "source" (absolute image folder), "class_names" (or null), "shard_size",
"shards": [{"moments", "labels" (or null), "count"}, ...], "complete"}. Shard K holds samples
K * shard_size ... ; all shards but the last are full.

Training never uses the mean alone: every step draws ``z = (mean + std * eps - shift) * scale``
with fresh eps ~ N(0, I), as the MeanFlow authors do with the SD-VAE (scale 0.18215).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import MeanFlowError, check, plural

FORMAT = "meanflow-latents"
VERSION = 1
META_NAME = "latents.json"


def is_latents_dir(path: str) -> bool:
    """True when ``path`` is a directory with a ``latents.json`` of the meanflow-latents format
    (complete or not)."""
    meta = os.path.join(str(path), META_NAME)
    if not os.path.isfile(meta):
        return False
    try:
        parsed = read_json(meta, "it", "")
    except MeanFlowError:
        return False
    return isinstance(parsed, dict) and parsed.get("format") == FORMAT


def read_json(path: str, what: str, fix: str):
    """The parsed JSON file ``path``, or one line: ``PATH: cannot read WHAT (error); FIX``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise MeanFlowError(
            f"{path}: cannot read {what} ({exc.__class__.__name__}); {fix}"
        ) from None


def read_meta(path: str) -> dict:
    """The parsed ``latents.json`` of directory ``path`` (any completeness), checked for the
    format and version."""
    meta_path = os.path.join(path, META_NAME)
    check(
        os.path.isdir(path),
        f"latents directory {path!r} does not exist; create it with "
        "`meanflow latents encode --data IMAGES --vae VAE_DIR --out LATENTS`",
    )
    check(
        os.path.isfile(meta_path),
        f"{path!r} is not a latents directory (no {META_NAME}); "
        "create one with `meanflow latents encode`",
    )
    meta = read_json(meta_path, "it", "rerun `meanflow latents encode ...` to rewrite it")
    check(
        isinstance(meta, dict) and meta.get("format") == FORMAT,
        f"{meta_path} is not a "
        f"{FORMAT} file; point at a folder written by `meanflow latents encode`",
    )
    check(
        meta.get("version") == VERSION,
        f"{meta_path} has format version "
        f"{meta.get('version')!r}; this meanflow reads version {VERSION}, encode again",
    )
    return meta


def _meta_field(key: str, kind, doc: str = "") -> property:
    """A read-only property: ``kind(meta[key])``, or None where latents.json has null."""

    def get(self):
        value = self.meta.get(key)
        return None if value is None else kind(value)

    return property(get, doc=doc or f"``{key}`` of latents.json.")


class LatentShards:
    """Read-only access to a complete latents directory.

    Opening reads only ``latents.json`` and checks that the shard files exist; a shard is
    opened on first use, once per process (``_maps``: shard -> open file; never pickled), so an
    instance can be pickled into DataLoader worker processes. Rows are read with ``pread``
    into the batch, not memory-mapped: a mapped page read once stays in the reader's resident
    memory (RssFile) until the kernel needs it, so over an epoch a mapping grows to the size of
    the data read (benchmarks/stream_memory.py); read this way, only the batch is resident.
    """

    def __init__(self, path: str) -> None:
        meta = read_meta(path)
        check(
            meta.get("complete") is True,
            f"{path!r} holds an unfinished encode "
            f"({plural(sum(s['count'] for s in meta.get('shards', [])), 'latent')} of "
            f"{meta.get('count')}); rerun `meanflow latents encode ...` to finish it",
        )
        self.path = os.path.abspath(path)
        self.meta = meta
        counts = [int(s["count"]) for s in meta["shards"]]
        check(
            sum(counts) == int(meta["count"]),
            f"{path}/{META_NAME}: shards hold "
            f"{sum(counts)} latents but count says {meta['count']}; encode again",
        )
        for shard in meta["shards"]:
            for key in ("moments", "labels"):
                name = shard.get(key)
                if name is not None:
                    check(
                        os.path.isfile(os.path.join(self.path, name)),
                        f"latents shard "
                        f"{os.path.join(self.path, name)!r} is missing; rerun `meanflow "
                        "latents encode ...` with the same settings to write it again",
                    )
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[int, _ShardFile] = {}
        self._pid = os.getpid()
        self._labels: np.ndarray | None = None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:  # open files stay behind; _shard opens them again
        return {**self.__dict__, "_maps": {}}

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"LatentShards({self.path!r}, count={self.count}, shape={self.shape}, "
            f"flips={self.flips})"
        )

    count = _meta_field("count", int)
    shape = _meta_field(
        "shape", lambda dims: tuple(int(d) for d in dims), "(C, H, W) of one latent."
    )
    flips = _meta_field("flips", int, "F: 2 when each image was also encoded flipped, else 1.")
    dtype = _meta_field("dtype", str, "Storage type of the moments: float32 or float16.")
    scaling_factor = _meta_field("scaling_factor", float)
    shift_factor = _meta_field("shift_factor", float, "The VAE's shift, None when it has none.")
    vae = _meta_field("vae", str, "Absolute folder of the VAE that encoded the latents.")
    image_size = _meta_field("image_size", int)
    class_names = _meta_field("class_names", list, "Class names, None for a flat folder.")

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabelled)."""
        names = self.class_names
        labelled = bool(self.meta["shards"]) and self.meta["shards"][0].get("labels") is not None
        return len(names) if names is not None and labelled else 0

    @property
    def labels(self) -> np.ndarray | None:
        """(N,) int64 class indices of all latents in order, or None when unlabelled."""
        if self._labels is None:
            names = [s.get("labels") for s in self.meta["shards"]]
            if any(n is None for n in names):
                return None
            parts = [np.load(os.path.join(self.path, n), allow_pickle=False) for n in names]
            self._labels = np.concatenate(parts).astype(np.int64, copy=False)
        return self._labels

    # ---------------------------------------------------------------------- data
    def _shard(self, k: int) -> _ShardFile:
        if self._pid != os.getpid():  # forked into a worker: open the files again here
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            shard = self.meta["shards"][k]
            self._maps[k] = _ShardFile(
                os.path.join(self.path, shard["moments"]),
                (int(shard["count"]), self.flips, 2, *self.shape),
            )
        return self._maps[k]

    def moments(self, indices) -> np.ndarray:
        """Moments of the latents ``indices`` (any order, any shards), float32
        (len, F, 2, C, H, W), in the order of ``indices``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size:
            low, high = int(indices.min()), int(indices.max())
            check(
                low >= 0 and high < self.count,
                f"latent index {low if low < 0 else high} is "
                f"out of range for {plural(self.count, 'latent')}",
            )
        out = np.empty((indices.size, self.flips, 2, *self.shape), np.float32)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for k in np.unique(shard_of):
            where = np.nonzero(shard_of == k)[0]
            local = indices[where] - self._starts[k]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[where[order]] = self._shard(int(k)).rows(local[order])
        return out

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``indices`` as ``(moments, labels)`` tensors: the streamed-batch interface of
        :class:`~meanflow.data.stream.BatchReader` (labels None when unlabelled)."""
        labels = self.labels
        y = None if labels is None else torch.from_numpy(labels[np.asarray(indices)])
        return torch.from_numpy(self.moments(indices)), y


_SHARD_FIX = "delete it and rerun `meanflow latents encode ...`"


class _ShardFile:
    """A ``moments-K.npy`` shard opened for reading rows by offset (``os.preadv``): nothing is
    mapped, so reading leaves no pages in the process's resident memory."""

    def __init__(self, path: str, expected: tuple[int, ...]) -> None:
        fix = _SHARD_FIX
        self.path = path
        try:
            self.handle = open(path, "rb", buffering=0)
            version = np.lib.format.read_magic(self.handle)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            check(
                read_header is not None,
                f"{path}: .npy format version {version} is not supported; {fix}",
            )
            assert read_header is not None  # check() raised otherwise
            shape, fortran, dtype = read_header(self.handle)
        except (OSError, ValueError) as exc:
            raise MeanFlowError(
                f"{path}: cannot read the shard ({exc.__class__.__name__}); it "
                f"is truncated or corrupt, {fix}"
            ) from None
        check(
            tuple(shape) == expected,
            f"{path}: shape {tuple(shape)}, expected {expected} from latents.json; {fix}",
        )
        check(
            not fortran and dtype.kind == "f" and dtype.itemsize in (2, 4),
            f"{path}: "
            f"holds {dtype}{' in Fortran order' * fortran}, not float32/float16 rows; {fix}",
        )
        self.dtype, self.row_shape = dtype, tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * dtype.itemsize
        self.offset = self.handle.tell()
        size = os.fstat(self.handle.fileno()).st_size
        check(
            size >= self.offset + shape[0] * self.row_bytes,
            f"{path}: {plural(size, 'byte')}"
            f", too short for shape {tuple(shape)}; it is truncated, {fix}",
        )

    def _read(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(self.handle.fileno(), [view[done:]], offset + done)
            else:  # no pread (Windows): this process's own handle, so seeking is safe
                self.handle.seek(offset + done)
                n = self.handle.readinto(view[done:])
            check(
                n > 0,
                f"{self.path}: ended early at byte {offset + done}; it is truncated, {_SHARD_FIX}",
            )
            done += n

    def rows(self, local: np.ndarray) -> np.ndarray:
        """Rows ``local`` (sorted ascending) in the file's dtype; runs of consecutive rows are
        read in one call."""
        out = np.empty((len(local), *self.row_shape), self.dtype)
        # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
        view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        start = 0
        for stop in range(1, len(local) + 1):
            if stop == len(local) or local[stop] != local[stop - 1] + 1:
                self._read(
                    view[start * self.row_bytes : stop * self.row_bytes],
                    self.offset + int(local[start]) * self.row_bytes,
                )
                start = stop
        return out


def draw_latents(
    moments: torch.Tensor,
    generator: torch.Generator | None,
    scaling_factor: float,
    shift_factor: float | None = None,
    flip: bool = False,
    total: int | None = None,
    part: slice = slice(None),
) -> torch.Tensor:
    """One posterior sample per row, in training scale: ``(B, C, H, W)`` float32.

    ``moments`` is (B, F, 2, C, H, W) (mean, std). With ``flip`` (the run's ``hflip``) and
    F == 2, the image or its mirror is chosen uniformly per row (``torch.randint(0, 2, (B,))``,
    drawn first); else f = 0, the image as stored, as the MeanFlow authors train (their
    ``LatentDataset`` never flips);
    then ``eps ~ N(0, I)`` (B, C, H, W) is drawn, both from ``generator`` on ``moments``'
    device, and ``z = (mean_f + std_f * eps - shift) * scaling_factor`` (shift 0 when None).

    Data-parallel training passes the global batch size ``total`` and this process's rows
    ``part``: the choices and ``eps`` are drawn for all ``total`` rows and sliced, so each row
    gets the same draw whatever the number of processes.
    """
    check(
        moments.ndim == 6 and moments.shape[2] == 2,
        f"draw_latents takes moments of shape (B, F, 2, C, H, W), got {tuple(moments.shape)}",
    )
    moments = moments.float()
    batch, device = moments.shape[0], moments.device
    total = batch if total is None else total
    if flip and moments.shape[1] == 2:
        choice = torch.randint(0, 2, (total,), generator=generator, device=device)[part]
    else:
        choice = torch.zeros(batch, dtype=torch.long, device=device)
    check(
        choice.shape[0] == batch,
        f"part {part} of {total} rows does not match the {batch} rows of moments",
    )
    chosen = moments[torch.arange(batch, device=device), choice]  # (B, 2, C, H, W)
    mean, std = chosen[:, 0], chosen[:, 1]
    eps = torch.randn(
        (total, *mean.shape[1:]), generator=generator, device=device, dtype=torch.float32
    )[part]
    return (mean + std * eps - (shift_factor or 0.0)) * scaling_factor


__all__ = [
    "LatentShards", "is_latents_dir", "read_meta", "read_json", "draw_latents", "FORMAT",
    "VERSION", "META_NAME",
]  # fmt: skip
