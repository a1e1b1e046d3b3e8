"""Training: configuration and presets, the loop, EMA, checkpoints, run directories."""

from .config import TrainConfig
from .loop import TrainResult, train
from .presets import PRESETS, apply_preset, configure, default_preset
from .run import TrainedRun, load_run

__all__ = [
    "TrainConfig", "PRESETS", "apply_preset", "default_preset", "configure", "train",
    "TrainResult", "load_run", "TrainedRun",
]  # fmt: skip
