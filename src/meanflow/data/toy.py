"""Built-in 2-D distributions, written here with NumPy only.

Each sampler takes ``(n, rng)`` with ``rng`` a ``numpy.random.Generator`` and returns an
(n, 2) float32 array. Coordinates lie roughly in [-4, 4]^2.

- ``checkerboard``: uniform on the 8 dark squares of a 4x4 board of side-2 squares on [-4, 4]^2.
- ``eight-gaussians``: equal mixture of 8 isotropic Gaussians (std 0.5) on a circle of radius 4.
- ``two-moons``: two interleaved half circles of radius 2 with Gaussian noise (std 0.2).
- ``rings``: 4 concentric circles of radius 1, 2, 3, 4 (points in proportion to length),
  radial Gaussian noise (std 0.08).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    pick = rng.integers(0, len(cells), size=n)
    corner = np.array(cells, dtype=np.float64)[pick] * 2.0 - 4.0
    return (corner + 2.0 * rng.random((n, 2))).astype(np.float32)


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = rng.integers(0, 8, size=n) * (np.pi / 4)
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centers + 0.5 * rng.standard_normal((n, 2))).astype(np.float32)


def two_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    upper = rng.random(n) < 0.5
    theta = np.pi * rng.random(n)
    x = np.where(upper, np.cos(theta), 1.0 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
    points = 2.0 * np.stack([x - 0.5, y - 0.25], axis=1)
    return (points + 0.2 * rng.standard_normal((n, 2))).astype(np.float32)


def rings(n: int, rng: np.random.Generator) -> np.ndarray:
    radii = np.array([1.0, 2.0, 3.0, 4.0])
    which = rng.choice(len(radii), size=n, p=radii / radii.sum())
    theta = 2 * np.pi * rng.random(n)
    radius = radii[which] + 0.08 * rng.standard_normal(n)
    return (radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)).astype(np.float32)


TOY_DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "checkerboard": checkerboard,
    "eight-gaussians": eight_gaussians,
    "two-moons": two_moons,
    "rings": rings,
}
