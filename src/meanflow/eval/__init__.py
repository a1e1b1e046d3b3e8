"""Evaluation metrics."""

from .distances import DEFAULT_PROJECTIONS, energy_distance, sliced_wasserstein

__all__ = ["sliced_wasserstein", "energy_distance", "DEFAULT_PROJECTIONS"]
