"""Sample-based distances between two point sets in R^D (vector data).

- Sliced Wasserstein-2 (Bonneel et al. 2015): ``SWD = sqrt(mean_k W2^2(<x, w_k>, <y, w_k>))``
  over ``projections`` directions ``w_k`` drawn uniformly on the unit sphere from a fixed seed
  (default 512). Each 1-D W2 compares the two empirical quantile functions at ``n = max(N, M)``
  levels ``(i + 0.5) / n`` (linear interpolation of the sorted projections).
- Energy distance (Szekely & Rizzo 2013): ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with unbiased
  U-statistics for the within-set terms (diagonal excluded). Zero iff the laws are equal.
"""

from __future__ import annotations

import torch

from ..errors import check

DEFAULT_PROJECTIONS = 512


def _as_points(a, name: str) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float64)
    check(
        a.dim() == 2 and a.shape[0] >= 2,
        f"{name} must have shape (N, D) with N >= 2, got {tuple(a.shape)}",
    )
    check(bool(torch.isfinite(a).all()), f"{name} holds NaN or Inf values")
    return a


def _quantiles(sorted_values: torch.Tensor, n: int) -> torch.Tensor:
    """Empirical quantile function of each column at levels (i + 0.5) / n."""
    m = sorted_values.shape[0]
    pos = ((torch.arange(n, dtype=torch.float64) + 0.5) / n * m - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo)[:, None]
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def sliced_wasserstein(x, y, projections: int = DEFAULT_PROJECTIONS, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between point sets ``x`` (N, D) and ``y`` (M, D)."""
    x, y = _as_points(x, "samples"), _as_points(y, "reference")
    check(
        x.shape[1] == y.shape[1],
        f"dimension mismatch: samples have D={x.shape[1]}, reference has D={y.shape[1]}",
    )
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=0, keepdim=True)
    n = max(x.shape[0], y.shape[0])
    qx = _quantiles((x @ w).sort(dim=0).values, n)
    qy = _quantiles((y @ w).sort(dim=0).values, n)
    return float((qx - qy).pow(2).mean().sqrt())


def _mean_distance(a: torch.Tensor, b: torch.Tensor, same: bool, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[i : i + chunk], b).sum())
    pairs = a.shape[0] * (a.shape[0] - 1) if same else a.shape[0] * b.shape[0]
    return total / pairs  # the diagonal of a set with itself is zero, so only the count changes


def energy_distance(x, y) -> float:
    """Energy distance between point sets ``x`` (N, D) and ``y`` (M, D)."""
    x, y = _as_points(x, "samples"), _as_points(y, "reference")
    check(
        x.shape[1] == y.shape[1],
        f"dimension mismatch: samples have D={x.shape[1]}, reference has D={y.shape[1]}",
    )
    return 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)
