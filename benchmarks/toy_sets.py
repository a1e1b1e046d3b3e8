"""2-D (and higher-D) point sets outside the built-ins, for tuning and checking the toy-2d preset
on data it was not chosen on (docs/onestep.md).

    python benchmarks/toy_sets.py --out /tmp/toy_sets            # every set, train + test files
    python benchmarks/toy_sets.py --out /tmp/toy_sets --sets spirals,pinwheel

Each set NAME is written as ``NAME-train.npy`` (50,000 points) and ``NAME-test.npy`` (held-out
points from another seed, 5,000 by default), float32 arrays of shape (N, D). The sets are split
into a tuning group (``TUNING``: the settings were chosen on these) and a held-out group
(``HELD_OUT``: only measured with the chosen settings).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

Sampler = Callable[[int, np.random.Generator], np.ndarray]


def spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved Archimedean spirals (radius grows linearly with angle), noise std 0.15."""
    arm = rng.integers(0, 2, size=n)
    s = np.sqrt(rng.random(n))  # uniform along the arm's length (length ~ angle^2)
    theta = 3.5 * np.pi * s
    radius = 4.0 * s
    angle = theta + np.pi * arm
    pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return pts + 0.15 * rng.standard_normal((n, 2))


def swiss_roll(n: int, rng: np.random.Generator) -> np.ndarray:
    """The 2-D Swiss roll: t ~ U[1.5 pi, 4.5 pi], point t (cos t, sin t) / 3, noise std 0.1."""
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    pts = t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1) / 3.0
    return pts + 0.1 * rng.standard_normal((n, 2))


def unequal_rings(n: int, rng: np.random.Generator) -> np.ndarray:
    """Three concentric circles of radius 1, 2.5, 4 with masses 0.6, 0.3, 0.1, radial std 0.1."""
    radii = np.array([1.0, 2.5, 4.0])
    which = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    theta = 2 * np.pi * rng.random(n)
    radius = radii[which] + 0.1 * rng.standard_normal(n)
    return radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)


def pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    """Five curved arms (Johnson et al. 2016's pinwheel): radial std 0.3, tangential 0.05,
    rotation rate 0.25, scaled by 1.5."""
    arms, rate = 5, 0.25
    labels = rng.integers(0, arms, size=n)
    feats = rng.standard_normal((n, 2)) * np.array([0.3, 0.05]) + np.array([1.0, 0.0])
    angles = 2 * np.pi * labels / arms + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    x = feats[:, 0] * c - feats[:, 1] * s
    y = feats[:, 0] * s + feats[:, 1] * c
    return 1.5 * np.stack([x, y], axis=1)


def smiley(n: int, rng: np.random.Generator) -> np.ndarray:
    """An image-like density: a face outline (circle radius 4), two eyes (Gaussian blobs std
    0.35) and a mouth (lower arc), with masses 0.45, 0.1 + 0.1, 0.35; line std 0.12."""
    part = rng.choice(4, size=n, p=[0.45, 0.1, 0.1, 0.35])
    out = np.empty((n, 2))
    theta = 2 * np.pi * rng.random(n)
    face = part == 0
    out[face] = 4.0 * np.stack([np.cos(theta[face]), np.sin(theta[face])], axis=1)
    for k, cx in ((1, -1.4), (2, 1.4)):
        m = part == k
        out[m] = np.array([cx, 1.3]) + 0.35 * rng.standard_normal((m.sum(), 2))
    mouth = part == 3
    a = np.pi * (1.2 + 0.6 * rng.random(mouth.sum()))
    out[mouth] = 2.4 * np.stack([np.cos(a), np.sin(a)], axis=1) + np.array([0.0, 0.3])
    line = part != 1
    line &= part != 2
    out[line] += 0.12 * rng.standard_normal((line.sum(), 2))
    return out


def banana(n: int, rng: np.random.Generator) -> np.ndarray:
    """A banana (twisted Gaussian): x ~ N(0, 2^2), y = 0.25 x^2 - 2 + N(0, 0.4^2)."""
    x = 2.0 * rng.standard_normal(n)
    y = 0.25 * x**2 - 2.0 + 0.4 * rng.standard_normal(n)
    return np.stack([x, y], axis=1)


def grid_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """25 Gaussians (std 0.2) on a 5 x 5 grid of spacing 2, with unequal masses (weights
    proportional to 1 + (i + j) mod 3)."""
    centers = np.array([(i, j) for i in range(5) for j in range(5)], dtype=float)
    w = 1.0 + (centers.sum(1) % 3)
    which = rng.choice(25, size=n, p=w / w.sum())
    return (centers[which] - 2.0) * 2.0 + 0.2 * rng.standard_normal((n, 2))


def anisotropic_mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    """Four elongated Gaussians of masses 0.4, 0.3, 0.2, 0.1 with random orientations (fixed)
    and standard deviations (1.2, 0.15) along their axes, centred on a square of side 5."""
    fixed = np.random.default_rng(1234)
    angles = fixed.random(4) * np.pi
    centers = np.array([[-2.5, -2.5], [2.5, -2.5], [2.5, 2.5], [-2.5, 2.5]])
    which = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    z = rng.standard_normal((n, 2)) * np.array([1.2, 0.15])
    c, s = np.cos(angles[which]), np.sin(angles[which])
    return centers[which] + np.stack([c * z[:, 0] - s * z[:, 1], s * z[:, 0] + c * z[:, 1]], 1)


def gaussian_mixture(dim: int) -> Sampler:
    """An 8-component Gaussian mixture in ``dim`` dimensions: centres of norm 4 in fixed random
    directions, std 0.5, equal masses."""

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        fixed = np.random.default_rng(dim)
        centers = fixed.standard_normal((8, dim))
        centers *= 4.0 / np.linalg.norm(centers, axis=1, keepdims=True)
        which = rng.integers(0, 8, size=n)
        return centers[which] + 0.5 * rng.standard_normal((n, dim))

    return sample


SETS: dict[str, Sampler] = {
    "spirals": spirals,
    "swiss-roll": swiss_roll,
    "unequal-rings": unequal_rings,
    "pinwheel": pinwheel,
    "smiley": smiley,
    "banana": banana,
    "grid-gaussians": grid_gaussians,
    "anisotropic-mixture": anisotropic_mixture,
    "gmm-8d": gaussian_mixture(8),
    "gmm-32d": gaussian_mixture(32),
}
TUNING = ("spirals", "swiss-roll", "unequal-rings", "pinwheel")
HELD_OUT = ("smiley", "banana", "grid-gaussians", "anisotropic-mixture")


def write(name: str, out: str, num_train: int = 50_000, num_test: int = 5_000) -> tuple[str, str]:
    """Write ``NAME-train.npy`` (seed 0) and ``NAME-test.npy`` (seed 1) into ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for split, num, seed in (("train", num_train, 0), ("test", num_test, 1)):
        pts = SETS[name](num, np.random.default_rng(seed)).astype(np.float32)
        path = os.path.join(out, f"{name}-{split}.npy")
        np.save(path, pts)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--num-train", type=int, default=50_000)
    ap.add_argument("--num-test", type=int, default=5_000)
    args = ap.parse_args()
    for name in args.sets.split(","):
        print(*write(name, args.out, args.num_train, args.num_test))


if __name__ == "__main__":
    main()
