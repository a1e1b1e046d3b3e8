"""The flow mathematics: the linear path and time convention (path.py), the ``(r, t)`` samplers
(times.py), the total derivative ``du/dt`` by JVP or finite differences (jvp.py) and the
few-step sampler ``z_r = z_t - (t - r) u(z_t, r, t)`` (sampling.py).

Layer: imports ``meanflow.errors`` and ``meanflow.nn`` (the forward-mode layers that the JVP
uses) only; no objective, data, run or training code.
"""

from .jvp import total_derivative
from .path import PathSample, broadcast_time, linear_path
from .sampling import parse_schedule, sample, uniform_schedule, validate_schedule
from .times import TimeSampler

__all__ = [
    "PathSample", "linear_path", "broadcast_time", "TimeSampler", "total_derivative", "sample",
    "uniform_schedule", "parse_schedule", "validate_schedule",
]  # fmt: skip
