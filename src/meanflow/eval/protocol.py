"""The image evaluation protocol of ``meanflow eval``: features of samples and of a reference split
in one feature network's space, Frechet distance, precision / recall, density / coverage, and
the floor (the same metrics between the training split and the reference split, so every number
has a scale).

Reference features are cached as ``.npz`` under ``cache_dir`` (default
``~/.cache/meanflow/reference``), keyed by the reference name, split and size, the feature
network's fingerprint and a SHA-256 fingerprint of the reference images themselves, so a cache
entry is never reused for other data or another extractor.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile

import numpy as np
import torch

from ..errors import check
from .features import FeatureExtractor, extract
from .frechet import fd_from_features
from .precision_recall import density_coverage, precision_recall

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "meanflow", "reference")


def content_fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def cached_features(
    images: torch.Tensor,
    label: str,
    extractor: FeatureExtractor,
    meta: dict,
    cache_dir: str | None = DEFAULT_CACHE,
    progress: bool = False,
    desc: str = "reference features",
) -> np.ndarray:
    """Features of ``images``, read from / written to the cache (``cache_dir=None``: no cache);
    ``progress``: a bar named ``desc`` on stderr while they are computed."""
    if cache_dir is None:
        return extract(extractor, images, progress=progress, desc=desc).numpy()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[-60:]
    path = os.path.join(
        cache_dir, f"{name}-{len(images)}-{meta['fingerprint']}-{content_fingerprint(images)}.npz"
    )
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["features"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache entry is recomputed
    features = extract(extractor, images, progress=progress, desc=desc).numpy()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=features)
    os.replace(tmp, path)
    return features


def feature_metrics(real: np.ndarray, fake: np.ndarray, metrics: tuple[str, ...]) -> dict:
    """FD (``fd``), precision / recall (k = 3) and density / coverage (k = 5) (``pr``)."""
    out = {}
    if "fd" in metrics:
        out["fd"] = fd_from_features(real, fake)
    if "pr" in metrics:
        out.update(precision_recall(real, fake, k=3))
        out.update(density_coverage(real, fake, k=5))
    return out


def image_metrics(
    fake: np.ndarray,
    reference: torch.Tensor,
    train: torch.Tensor,
    extractor: FeatureExtractor,
    meta: dict,
    metrics: tuple[str, ...],
    reference_label: str,
    cache_dir: str | None = DEFAULT_CACHE,
    progress: bool = False,
) -> dict:
    """Metrics of sample features ``fake`` (N, 128) against the ``reference`` images' features,
    and the floor: as many training images against the same reference."""
    real = cached_features(reference, reference_label, extractor, meta, cache_dir, progress)
    result = feature_metrics(real, fake, metrics)
    floor_train = cached_features(
        train[: len(fake)],
        reference_label + "-train",
        extractor,
        meta,
        cache_dir,
        progress,
        "training features (floor)",
    )
    floor = feature_metrics(real, floor_train, metrics)
    result.update({f"{k}_floor": v for k, v in floor.items()})
    return result


def sample_features(
    run,
    extractors: dict[str, FeatureExtractor],
    num: int,
    *,
    keep_images: bool = False,
    progress: bool = True,
    **sample_kwargs,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Sample ``run`` in batches and turn each batch into the features of every extractor
    (by name); memory is bounded by the features (N x D floats each), the images are kept only
    with ``keep_images``."""
    from tqdm import tqdm

    for net in extractors.values():
        check(
            run.sample_shape[0] in net.channels,
            f"the feature network takes images of "
            f"{' or '.join(map(str, net.channels))} channels, the run generates "
            f"{run.sample_shape}",
        )
    features: dict[str, list] = {name: [] for name in extractors}
    images = []
    batch = sample_kwargs.pop("batch", 256)
    bar = tqdm(
        total=num,
        disable=not progress,
        unit="sample",
        desc="sampling + features",
        dynamic_ncols=True,
    )
    for chunk in run.iter_samples(num, batch=batch, **sample_kwargs):
        for name, net in extractors.items():
            features[name].append(extract(net, chunk).numpy())
        if keep_images:
            images.append(chunk.numpy())
        bar.update(len(chunk))
    bar.close()
    return (
        {name: np.concatenate(f) for name, f in features.items()},
        np.concatenate(images) if keep_images else None,
    )
