"""Encode a folder of images (ADM centre crop; with ``flip`` also its horizontal mirror) with a
diffusers VAE into the shards of a latents directory (format in :mod:`meanflow.data.latents`),
resumable by rerunning the same command. Mirrors are off by default: the MeanFlow authors encode
the centre crop alone (their ``utils/data_util.py``).

Each shard is written to a temporary file and renamed into place, then ``latents.json`` is
rewritten (also atomically) to list it, so a killed encode loses at most the shard in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import numpy as np
import torch

from ..errors import MeanFlowError, check
from ..runtime.devices import resolve_device
from .image_folder import list_image_folder, read_image
from .latents import FORMAT, META_NAME, VERSION, read_meta
from .vae import adm_center_crop, encode, find_vae_dir, load_vae, vae_downsampling, vae_factors

# the settings recorded in latents.json that a resumed encode must share, and how to set them
_SETTING_FLAGS = {
    "vae": "--vae",
    "image_size": "--image-size",
    "flips": "--flip / --no-flip",
    "dtype": "--dtype",
    "shard_size": "--shard-size",
    "source": "--data",
    "count": "the images in --data",
    "class_names": "the class folders in --data",
    "files_digest": "the image files in --data",
    "shape": "--vae",
    "scaling_factor": "--vae",
    "shift_factor": "--vae",
}


def _files_digest(directory: str, files: list[str]) -> str:
    """sha256 of the files' paths relative to ``directory`` (detects a changed folder)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, directory).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


class _CropDataset(torch.utils.data.Dataset):
    """Image ``i`` of ``files`` ADM-cropped to (3, S, S) uint8; a failure is returned as a
    message (so that a worker process reports it as one line)."""

    def __init__(self, files: list[str], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str]:
        try:
            image, _ = read_image(self.files[index])
        except MeanFlowError as exc:
            return None, str(exc)
        crop = adm_center_crop(image, self.size)
        return np.asarray(crop, np.uint8).transpose(2, 0, 1).copy(), ""


def cropped_images(folder: str, size: int, count: int | None = None, seed: int = 0) -> torch.Tensor:
    """``count`` images of ``folder`` (a seeded random choice; all when None or fewer), ADM-cropped
    to ``size`` as for encoding, as float32 (n, 3, S, S) in [-1, 1]: the training images of a
    latent run, e.g. for an evaluation's floor."""
    files, _, _ = list_image_folder(folder)
    pick = np.random.default_rng(seed).permutation(len(files))[:count]
    dataset = _CropDataset([files[i] for i in sorted(pick)], size)
    arrays = []
    for i in range(len(dataset)):
        array, message = dataset[i]
        check(array is not None, message)
        assert array is not None  # check() raised otherwise
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1.0


def _collate(items):
    errors = [message for _, message in items if message]
    if errors:
        return None, errors[0]
    return torch.from_numpy(np.stack([array for array, _ in items])), ""


def _save_atomic(path: str, write) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_meta(out: str, meta: dict) -> None:
    text = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
    _save_atomic(os.path.join(out, META_NAME), lambda handle: handle.write(text))


def _write_shard(out: str, k: int, moments: np.ndarray, labels: np.ndarray | None) -> dict:
    """Write shard ``k`` (moments, and labels unless None) and return its latents.json entry."""
    entry: dict[str, Any] = {
        "moments": f"moments-{k:05d}.npy",
        "labels": None if labels is None else f"labels-{k:05d}.npy",
        "count": len(moments),
    }
    _save_atomic(
        os.path.join(out, entry["moments"]),
        lambda handle: np.save(handle, moments, allow_pickle=False),
    )
    if labels is not None:
        _save_atomic(
            os.path.join(out, entry["labels"]),
            lambda handle: np.save(handle, labels, allow_pickle=False),
        )
    return entry


def _valid_shards(out: str, meta: dict) -> list[dict]:
    """The leading shards listed in ``meta`` whose files exist with the expected shapes (a
    resumed encode rewrites everything from the first one that does not)."""
    good = []
    for k, entry in enumerate(meta["shards"]):
        expected = min(meta["shard_size"], meta["count"] - k * meta["shard_size"])
        try:
            moments = np.load(
                os.path.join(out, entry["moments"]), mmap_mode="r", allow_pickle=False
            )
            ok = (
                moments.shape == (expected, meta["flips"], 2, *meta["shape"])
                and entry["count"] == expected
                and str(moments.dtype) == meta["dtype"]
            )
            if entry.get("labels") is not None:
                labels = np.load(
                    os.path.join(out, entry["labels"]), mmap_mode="r", allow_pickle=False
                )
                ok = ok and labels.shape == (expected,)
        except (OSError, ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            break
        good.append(entry)
    return good


def _prepare_out(out: str, settings: dict) -> dict:
    """The metadata to continue in ``out``: an existing encode with the same ``settings``, or
    a new one; refuses other settings (naming them) and folders that hold something else."""
    check(not os.path.isfile(out), f"--out {out!r} is a file; give a directory for the latents")
    fresh = dict(format=FORMAT, version=VERSION, **settings, shards=[], complete=False)
    if os.path.isdir(out) and os.path.exists(os.path.join(out, META_NAME)):
        meta = read_meta(out)
        changed = sorted(
            (k for k, v in settings.items() if meta.get(k) != v), key=list(_SETTING_FLAGS).index
        )  # what the user set first
        if changed:
            first = changed[0]
            raise MeanFlowError(
                f"--out {out!r} holds latents encoded with other settings: {first} is "
                f"{meta.get(first)!r} there but {settings[first]!r} now (given by "
                f"{_SETTING_FLAGS.get(first, first)}"
                f"{'; also ' + ', '.join(changed[1:]) if len(changed) > 1 else ''}); rerun the "
                "command that made it to resume it, or choose another --out (or delete this one)"
            )
        meta["shards"] = _valid_shards(out, meta)
        meta["complete"] = sum(s["count"] for s in meta["shards"]) == meta["count"]
        return meta
    if os.path.isdir(out):
        stray = [n for n in os.listdir(out) if not n.startswith(".")]
        check(
            not stray,
            f"--out {out!r} exists and is not a latents directory (it holds "
            f"{stray[0]}); choose another --out",
        )
    os.makedirs(out, exist_ok=True)
    return fresh


def encode_folder(
    data: str,
    vae_path: str,
    out: str,
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = 1024,
    flip: bool = False,
    dtype: str = "float32",
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Encode the images of folder ``data`` with the VAE in ``vae_path`` into the latents
    directory ``out`` (resuming an unfinished encode with the same settings there). Returns
    ``{"out", "count", "shape", "shards", "seconds"}``."""
    from tqdm import tqdm

    start_time = time.perf_counter()
    for name, value in (
        ("--image-size", image_size),
        ("--batch-size", batch_size),
        ("--shard-size", shard_size),
    ):
        check(
            isinstance(value, int) and value > 0,
            f"{name} must be a positive integer, got {value!r}",
        )
    check(
        isinstance(workers, int) and workers >= 0, f"--workers must be 0 or more, got {workers!r}"
    )
    check(dtype in ("float32", "float16"), f"--dtype must be float32 or float16, got {dtype!r}")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MeanFlowError(
            "image folders need Pillow; run `pip install 'meanflow[images]'`"
        ) from None
    files, labels, class_names = list_image_folder(data)
    torch_device = resolve_device(device)
    vae = load_vae(vae_path, torch_device)
    down = vae_downsampling(vae)
    check(
        image_size % down == 0,
        f"--image-size {image_size} is not a multiple of the VAE's "
        f"downsampling factor {down}; use e.g. {max(down, image_size // down * down)}",
    )
    scaling_factor, shift_factor = vae_factors(vae)
    side = image_size // down
    settings: dict[str, Any] = {
        "count": len(files),
        "shape": [int(vae.config.latent_channels), side, side],
        "flips": 2 if flip else 1,
        "dtype": dtype,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "vae": find_vae_dir(vae_path),
        "image_size": image_size,
        "source": os.path.abspath(data),
        "class_names": class_names,
        "shard_size": shard_size,
        "files_digest": _files_digest(data, files),
    }
    meta = _prepare_out(out, settings)
    label_array = None if labels is None else np.asarray(labels, np.int64)
    num_shards = -(-len(files) // shard_size)
    first = len(meta["shards"])
    done = sum(s["count"] for s in meta["shards"])
    if first < num_shards:
        meta["complete"] = False
        _write_meta(out, meta)
    # batches never cross a shard, so a resumed encode sees the same batches
    batches = [
        list(range(b, min(b + batch_size, (k + 1) * shard_size, len(files))))
        for k in range(first, num_shards)
        for b in range(k * shard_size, min((k + 1) * shard_size, len(files)), batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        _CropDataset(files, image_size),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
    )
    flips = settings["flips"]
    bar = tqdm(
        total=len(files),
        initial=done,
        disable=not progress,
        unit="img",
        desc="encode",
        dynamic_ncols=True,
    )
    try:
        k, filled, moments = first, 0, None
        for pixels, error in loader:
            check(not error, error)
            if moments is None:
                count = min(shard_size, len(files) - k * shard_size)
                moments = np.empty((count, flips, 2, *settings["shape"]), np.dtype(dtype))
            images = pixels.float() * (2.0 / 255.0) - 1.0
            if flips == 2:
                images = torch.cat([images, images.flip(-1)])
            mean, std = encode(vae, images)
            n = len(pixels)
            both = torch.stack([mean, std], dim=1)  # (F * n, 2, C, h, w), image rows first
            both = both.reshape(flips, n, 2, *both.shape[2:]).transpose(0, 1)
            moments[filled : filled + n] = both.cpu().numpy().astype(dtype, copy=False)
            filled += n
            bar.update(n)
            if filled == len(moments):
                span = slice(k * shard_size, k * shard_size + filled)
                entry = _write_shard(
                    out, k, moments, None if label_array is None else label_array[span]
                )
                meta["shards"].append(entry)
                meta["complete"] = k == num_shards - 1
                _write_meta(out, meta)
                k, filled, moments = k + 1, 0, None
    finally:
        bar.close()
    if not meta["complete"]:  # nothing was left to encode, but the file said otherwise
        meta["complete"] = True
        _write_meta(out, meta)
    return {
        "out": out,
        "count": len(files),
        "shape": settings["shape"],
        "shards": num_shards,
        "seconds": round(time.perf_counter() - start_time, 2),
    }


__all__ = ["encode_folder", "cropped_images"]
