"""Fidelity and diversity of samples from k-nearest-neighbour balls around each point.

The ball of point ``x`` in set ``S`` has radius ``r_k(x)`` = distance from ``x`` to its k-th
nearest neighbour in ``S`` (``x`` itself excluded). A point lies in a ball when its distance to the
centre is ``<= r``. With ``N`` real points ``X`` and ``M`` fake points ``Y``:

- Improved precision and recall (Kynkaanniemi et al. 2019):
  ``precision = (1/M) sum_j 1[exists i: |y_j - x_i| <= r_k(x_i)]`` (fake inside the real manifold),
  ``recall = (1/N) sum_i 1[exists j: |x_i - y_j| <= r_k(y_j)]`` (real inside the fake manifold).
- Density and coverage (Naeem et al. 2020), balls around real points only:
  ``density = 1/(k M) sum_j sum_i 1[|y_j - x_i| <= r_k(x_i)]`` (about 1 when ``Y`` and ``X`` are
  independent samples of one law; can exceed 1),
  ``coverage = (1/N) sum_i 1[exists j: |x_i - y_j| <= r_k(x_i)]``.

Distances are Euclidean, in float64, computed block by block (``batch_size`` rows and columns at a
time), so memory stays ``O(batch_size^2)`` whatever ``N`` and ``M`` are.
"""

from __future__ import annotations

import torch

from ..errors import check, plural

DEFAULT_BATCH = 1024
_EXACT_MAX_DIM = 32  # up to this dimension distances are summed directly (exact, symmetric)


def _as_points(a, name: str) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        try:
            a = torch.as_tensor(a)
        except (TypeError, ValueError, RuntimeError):
            check(False, f"{name} must be a numeric array of shape (N, D), got {type(a).__name__}")
    check(
        a.dim() == 2 and a.shape[0] >= 1 and a.shape[1] >= 1,
        f"{name} must have shape (N, D) with N >= 1, got {tuple(a.shape)}",
    )
    check(not a.is_complex(), f"{name} must hold real numbers, got complex values")
    a = a.detach().to("cpu", torch.float64)
    check(bool(torch.isfinite(a).all()), f"{name} holds NaN or Inf values")
    return a


def _pair(x, y, names: tuple[str, str] = ("real", "fake")) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two point sets of one dimension and centre both on their pooled mean."""
    x, y = _as_points(x, names[0]), _as_points(y, names[1])
    check(
        x.shape[1] == y.shape[1],
        f"dimension mismatch: {names[0]} has D={x.shape[1]}, {names[1]} has D={y.shape[1]}",
    )
    centre = torch.cat([x, y]).mean(dim=0)  # distances are translation invariant; this
    return x - centre, y - centre  # reduces cancellation in |a|^2 + |b|^2 - 2ab


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mode = (
        "donot_use_mm_for_euclid_dist" if a.shape[1] <= _EXACT_MAX_DIM else "use_mm_for_euclid_dist"
    )
    return torch.cdist(a, b, compute_mode=mode)


def _check_k(k: int, sets: dict[str, torch.Tensor]) -> None:
    check(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1,
        f"k must be a positive integer, got {k!r}",
    )
    for name, s in sets.items():
        check(
            k < s.shape[0],
            f"k={k} needs more than {plural(k, 'point')} in {name}, got "
            f"{s.shape[0]}; lower k or pass more samples",
        )


def _knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in ``x`` (itself excluded)."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, batch):
        rows = x[i : i + batch]
        best = torch.full((rows.shape[0], k), float("inf"), dtype=torch.float64)
        for j in range(0, n, batch):
            d = _cdist(rows, x[j : j + batch])
            if i == j:  # same block boundaries: this block holds the self-distances
                d.fill_diagonal_(float("inf"))
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        radii[i : i + batch] = best.max(dim=1).values
    return radii


def _ball_counts(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int
) -> torch.Tensor:
    """For each query, the number of balls ``(centres, radii)`` that contain it."""
    counts = torch.zeros(queries.shape[0], dtype=torch.int64)
    for i in range(0, queries.shape[0], batch):
        for j in range(0, centres.shape[0], batch):
            inside = (
                _cdist(queries[i : i + batch], centres[j : j + batch]) <= radii[None, j : j + batch]
            )
            counts[i : i + batch] += inside.sum(dim=1)
    return counts


def _nearest(queries: torch.Tensor, others: torch.Tensor, batch: int) -> torch.Tensor:
    """Distance from each query to its nearest point in ``others``."""
    out = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64)
    for i in range(0, queries.shape[0], batch):
        for j in range(0, others.shape[0], batch):
            d = _cdist(queries[i : i + batch], others[j : j + batch]).min(dim=1).values
            out[i : i + batch] = torch.minimum(out[i : i + batch], d)
    return out


def _check_batch(batch_size: int) -> None:
    check(
        isinstance(batch_size, int) and batch_size >= 1,
        f"batch_size must be a positive integer, got {batch_size!r}",
    )


def precision_recall(real, fake, k: int = 3, batch_size: int = DEFAULT_BATCH) -> dict[str, float]:
    """Improved precision and recall of ``fake`` (M, D) against ``real`` (N, D); needs k < N, M."""
    x, y = _pair(real, fake)
    _check_k(k, {"real": x, "fake": y})
    _check_batch(batch_size)
    real_radii, fake_radii = _knn_radii(x, k, batch_size), _knn_radii(y, k, batch_size)
    precision = (_ball_counts(y, x, real_radii, batch_size) > 0).double().mean()
    recall = (_ball_counts(x, y, fake_radii, batch_size) > 0).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real, fake, k: int = 5, batch_size: int = DEFAULT_BATCH) -> dict[str, float]:
    """Density and coverage of ``fake`` (M, D) against ``real`` (N, D); needs k < N."""
    x, y = _pair(real, fake)
    _check_k(k, {"real": x})
    _check_batch(batch_size)
    radii = _knn_radii(x, k, batch_size)
    density = _ball_counts(y, x, radii, batch_size).sum().item() / (k * y.shape[0])
    coverage = (_nearest(x, y, batch_size) <= radii).double().mean()
    return {"density": float(density), "coverage": float(coverage)}
