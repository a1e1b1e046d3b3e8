"""Evaluation: distances between samples and data (SWD, energy, MMD), Frechet distance and
precision/recall in a feature network's space, the feature networks, Inception for FID, and
the evaluation protocol (protocol.py).

Layer: imports ``meanflow.runs`` and everything below it; never ``meanflow.train`` or
``meanflow.cli``.
"""

from .distances import DEFAULT_PROJECTIONS, energy_distance, sliced_wasserstein
from .frechet import FeatureStats, fd_from_features, frechet_distance
from .mmd import default_bandwidths, mmd2
from .precision_recall import density_coverage, precision_recall

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "DEFAULT_PROJECTIONS",
    "FeatureStats",
    "frechet_distance",
    "fd_from_features",
    "precision_recall",
    "density_coverage",
    "mmd2",
    "default_bandwidths",
]
