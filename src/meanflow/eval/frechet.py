"""Frechet distance between Gaussians fitted to two sets of feature vectors (FID, FD).

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` (Dowson & Landau 1982; Heusel
et al. 2017), the squared Wasserstein-2 distance between ``N(mu1, S1)`` and ``N(mu2, S2)``.

The trace term is computed stably as ``tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i)`` with
``lambda_i`` the eigenvalues of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}`` (similar to
``S1 S2``); ``S1^{1/2}`` comes from a symmetric eigendecomposition. Eigenvalues are clipped at 0
before every square root, and everything runs in float64, so singular covariances are fine.

Bias: FD from ``n`` samples is biased upwards; the bias shrinks roughly like ``1/n`` and is large
when ``n`` is not much bigger than the feature dimension ``d`` (with ``n <= d`` the sample
covariance is singular). Only compare FD values computed with the same ``n``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MeanFlowError, check


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MeanFlowError(f"features must be numeric arrays, got {type(a).__name__}") from e


class FeatureStats:
    """Streaming mean and covariance of feature vectors, in float64.

    Batches are merged with the pairwise update of Chan et al. (1979): each batch contributes its
    own mean and centred scatter matrix, which avoids the cancellation of ``E[xx^T] - mu mu^T``.
    """

    def __init__(self) -> None:
        self._count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Add a batch of feature vectors of shape (n, d); returns ``self``."""
        x = _to_numpy(features)
        check(x.ndim == 2, f"features must have shape (n, d), got shape {x.shape}")
        if self._mean is not None:
            check(
                x.shape[1] == self.dim,
                f"feature dimension changed between updates: "
                f"had d={self.dim}, got d={x.shape[1]}; use one feature extractor per stats",
            )
        check(
            bool(np.isfinite(x).all()),
            "features hold NaN or Inf values; check the model outputs and the feature extractor",
        )
        n = x.shape[0]
        if n == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None:
            self._count, self._mean, self._scatter = n, mean_b, scatter_b
            return self
        total = self._count + n
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n / total)
        weight = self._count * n / total
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * weight
        self._count = total
        return self

    @property
    def count(self) -> int:
        """Number of feature vectors seen."""
        return self._count

    @property
    def dim(self) -> int:
        """Feature dimension ``d`` (0 before the first non-empty update)."""
        return 0 if self._mean is None else int(self._mean.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """Sample mean, shape (d,)."""
        check(self._mean is not None, "no features yet: call update() before reading the mean")
        assert self._mean is not None  # check() raised otherwise
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (divides by n - 1), shape (d, d)."""
        check(
            self._count >= 2,
            f"too few samples: a covariance needs at least 2 feature "
            f"vectors, got {self._count}; pass a larger --num",
        )
        assert self._scatter is not None  # set by the first non-empty update()
        return self._scatter / (self._count - 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"mu", "sigma", "count"}`` for ``np.savez(path, **stats.to_arrays())``."""
        return {"mu": self.mean, "sigma": self.cov, "count": np.asarray(self._count)}

    @classmethod
    def from_arrays(cls, mu, sigma, count) -> FeatureStats:
        """Rebuild from saved arrays, e.g. ``FeatureStats.from_arrays(**np.load(path))``."""
        mu, sigma = _to_numpy(mu), _to_numpy(sigma)
        check(
            mu.ndim == 1 and sigma.shape == (mu.shape[0],) * 2,
            f"saved stats must hold mu "
            f"of shape (d,) and sigma of shape (d, d), got {mu.shape} and {sigma.shape}",
        )
        count_arr = np.asarray(count)
        check(
            count_arr.ndim == 0 and float(count_arr) == int(count_arr) and int(count_arr) >= 2,
            f"saved stats need an integer count >= 2, got {count_arr.tolist()}",
        )
        check(
            bool(np.isfinite(mu).all() and np.isfinite(sigma).all()),
            "saved stats hold NaN or Inf values; recompute them",
        )
        stats = cls()
        stats._count = int(count_arr)
        stats._mean = mu.copy()
        stats._scatter = sigma * (stats._count - 1)
        return stats


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    check(
        mu.ndim == 1 and sigma.shape == (mu.shape[0],) * 2,
        f"{which} stats must be mu of shape "
        f"(d,) and sigma of shape (d, d), got {mu.shape} and {sigma.shape}",
    )
    check(
        bool(np.isfinite(mu).all() and np.isfinite(sigma).all()),
        f"{which} stats hold NaN or Inf values",
    )


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (see module docstring).

    Covariances are symmetrised (``(S + S^T) / 2``) first. The result is clipped at 0 (FD is a
    squared distance; tiny negative values are round-off).
    """
    mu1, sigma1, mu2, sigma2 = (_to_numpy(a) for a in (mu1, sigma1, mu2, sigma2))
    _check_gaussian(mu1, sigma1, "first")
    _check_gaussian(mu2, sigma2, "second")
    check(
        mu1.shape == mu2.shape,
        f"dimension mismatch: first stats have d={mu1.shape[0]}, "
        f"second stats have d={mu2.shape[0]}; compute both with the same feature extractor",
    )
    s1, s2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * trace_sqrt
    return max(fd, 0.0)


def fd_from_features(a, b) -> float:
    """Frechet distance between Gaussians fitted to features ``a`` (N, d) and ``b`` (M, d).

    Needs N, M >= 2. With fewer samples than dimensions the covariances are singular; the value is
    still computed but is strongly biased upwards (see module docstring).
    """
    stats = []
    for name, x in (("first", a), ("second", b)):
        s = FeatureStats().update(x)
        check(
            s.count >= 2,
            f"too few samples: FD needs at least 2 feature vectors per set, "
            f"got {s.count} in the {name} set; pass a larger --num",
        )
        stats.append(s)
    check(
        stats[0].dim == stats[1].dim,
        f"dimension mismatch: first features have "
        f"d={stats[0].dim}, second have d={stats[1].dim}; use the same feature extractor",
    )
    return frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)
