"""Squared maximum mean discrepancy (Gretton et al. 2012) with a sum of Gaussian kernels.

``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))`` over bandwidths ``s``. For ``x`` (N, D) and
``y`` (M, D) the unbiased estimate is

``MMD_u^2 = 1/(N(N-1)) sum_{i != j} k(x_i, x_j) + 1/(M(M-1)) sum_{i != j} k(y_i, y_j)
          - 2/(N M) sum_{i, j} k(x_i, y_j)``,

which can be slightly negative when the two laws are equal. Default bandwidths (median
heuristic): ``s = c * med`` for ``c`` in ``(0.5, 1, 2)``, where ``med`` is the median Euclidean
distance over distinct pairs ``i < j`` of the pooled sample ``[x; y]`` (the lower middle value
when the number of pairs is even). When the pooled sample has more than ``MEDIAN_MAX_POINTS``
points, ``med`` uses a fixed random subset of that many pooled points (seed 0), so the default is
deterministic. Everything runs in float64, ``batch_size`` rows and columns at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from ..errors import check
from .precision_recall import DEFAULT_BATCH, _cdist, _pair

BANDWIDTH_SCALES = (0.5, 1.0, 2.0)
MEDIAN_MAX_POINTS = 2048


def _median_distance(z: torch.Tensor) -> float:
    if z.shape[0] > MEDIAN_MAX_POINTS:
        g = torch.Generator().manual_seed(0)
        z = z[torch.randperm(z.shape[0], generator=g)[:MEDIAN_MAX_POINTS]]
    i, j = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    return float(_cdist(z, z)[i, j].median())


def default_bandwidths(x, y) -> list[float]:
    """The median-heuristic bandwidths ``mmd2`` uses when none are given (module docstring)."""
    return _bandwidths(*_pair(x, y, ("x", "y")))


def _bandwidths(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    med = _median_distance(torch.cat([x, y]))
    check(
        med > 0, "median pairwise distance is 0 (most points coincide); pass bandwidths explicitly"
    )
    return [c * med for c in BANDWIDTH_SCALES]


def _kernel_sum(
    a: torch.Tensor, b: torch.Tensor, inv_two_s2: torch.Tensor, same: bool, batch: int
) -> float:
    """Sum of k(a_i, b_j) over all pairs, or over i != j when ``a`` and ``b`` are one set."""
    total = 0.0
    for i in range(0, a.shape[0], batch):
        for j in range(0, b.shape[0], batch):
            d2 = _cdist(a[i : i + batch], b[j : j + batch]).square()
            # a tensor, not sum()'s start 0: inv_two_s2 holds at least one bandwidth
            kern = cast(torch.Tensor, sum(torch.exp(-d2 * g) for g in inv_two_s2))
            total += float(kern.sum())
            if same and i == j:  # same block boundaries: this block holds the diagonal
                total -= float(kern.diagonal().sum())
    return total


def mmd2(
    x, y, bandwidths: float | Sequence[float] | None = None, batch_size: int = DEFAULT_BATCH
) -> float:
    """Unbiased squared MMD between ``x`` (N, D) and ``y`` (M, D), N, M >= 2 (module docstring)."""
    xs, ys = _pair(x, y, ("x", "y"))
    check(
        xs.shape[0] >= 2 and ys.shape[0] >= 2,
        f"too few samples: MMD needs at least 2 points "
        f"per set, got {xs.shape[0]} and {ys.shape[0]}; pass a larger --num",
    )
    check(
        isinstance(batch_size, int) and batch_size >= 1,
        f"batch_size must be a positive integer, got {batch_size!r}",
    )
    if bandwidths is None:
        bandwidths = _bandwidths(xs, ys)
    try:
        s = torch.as_tensor(bandwidths, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        s = None
    check(
        s is not None and s.numel() >= 1 and bool(torch.isfinite(s).all() and (s > 0).all()),
        f"bandwidths must be one or more positive finite numbers, got {bandwidths!r}",
    )
    assert s is not None  # check() raised otherwise
    inv_two_s2 = 1.0 / (2.0 * s.square())
    n, m = xs.shape[0], ys.shape[0]
    kxx = _kernel_sum(xs, xs, inv_two_s2, True, batch_size) / (n * (n - 1))
    kyy = _kernel_sum(ys, ys, inv_two_s2, True, batch_size) / (m * (m - 1))
    kxy = _kernel_sum(xs, ys, inv_two_s2, False, batch_size) / (n * m)
    return kxx + kyy - 2.0 * kxy
