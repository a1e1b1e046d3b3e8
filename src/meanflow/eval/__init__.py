"""Evaluation: distances between samples and data (SWD, energy, MMD), Frechet distance and
precision/recall in a feature network's space, the feature networks, Inception for FID, and
the evaluation protocol (protocol.py, references.py) and :func:`evaluate_run` (run_eval.py),
which samples a run and measures it as ``meanflow eval`` does.

Layer: imports ``meanflow.runs`` and everything below it; never ``meanflow.train`` or
``meanflow.cli``.
"""

from .distances import DEFAULT_PROJECTIONS, energy_distance, sliced_wasserstein
from .frechet import FeatureStats, fd_from_features, frechet_distance
from .mmd import default_bandwidths, mmd2
from .precision_recall import density_coverage, precision_recall
from .run_eval import evaluate_run

__all__ = [
    "evaluate_run",
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
