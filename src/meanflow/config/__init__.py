"""A run's settings: the :class:`TrainConfig` dataclasses and ``--set`` overrides (schema.py),
the help text of every key (help.py), the named presets (presets.py), and what a configuration
builds: the network, the objective and the augmentation (build.py).

Layer: imports ``meanflow.nn``, ``meanflow.flow``, ``meanflow.objectives``, ``meanflow.data``
(the augmentation pipe) and ``meanflow.errors``; nothing that reads or writes run directories.
"""

from .build import build_augment, build_model, build_objective, count_parameters
from .presets import PRESETS, apply_preset, configure, default_preset
from .schema import TrainConfig

__all__ = [
    "TrainConfig", "PRESETS", "apply_preset", "configure", "default_preset", "build_model",
    "build_objective", "build_augment", "count_parameters",
]  # fmt: skip
