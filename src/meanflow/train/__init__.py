"""Training: the loop and its step, EMA, the optimizer, batches, reliability (signals, NaN
guard), pictures, and the ablation studies.

Layer: imports ``meanflow.eval``, ``meanflow.runs`` and everything below; only
``meanflow.cli`` imports it. Re-exports the configuration and run loaders for convenience.
"""

from ..config.presets import PRESETS, apply_preset, configure, default_preset
from ..config.schema import TrainConfig
from ..runs.load import load_run
from ..runs.run import TrainedRun
from .loop import TrainResult, train
from .rundir import fit

__all__ = [
    "TrainConfig", "PRESETS", "apply_preset", "default_preset", "configure", "train",
    "TrainResult", "fit", "load_run", "TrainedRun",
]  # fmt: skip
