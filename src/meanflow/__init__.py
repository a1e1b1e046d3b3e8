"""meanflow: one-step generative modeling with MeanFlow (Geng et al. 2025, arXiv 2505.13447).

Conventions: t = 0 is data, t = 1 is noise, ``z_t = (1 - t) x + t e``, ``v = e - x``; the
network ``u(z, r, t)`` predicts the average velocity over [r, t]; one-step sampling is
``x = e - u(e, 0, 1)``.
"""

from ._version import __version__
from .errors import MeanFlowError
from .flow.path import linear_path
from .flow.sampling import sample, uniform_schedule
from .flow.times import TimeSampler
from .objectives.flow_matching import FlowMatching
from .objectives.guidance import Guidance, GuidedFlowMatching, GuidedMeanFlow, sampling_guidance
from .objectives.meanflow import MeanFlow, ObjectiveOutput
from .runtime.threads import set_threads

__all__ = [
    "MeanFlow", "Guidance", "GuidedMeanFlow", "GuidedFlowMatching", "FlowMatching",
    "ObjectiveOutput", "TimeSampler", "sample", "sampling_guidance", "uniform_schedule",
    "linear_path", "fit",
    "load_run", "TrainedRun", "from_pretrained", "MeanFlowPipeline", "set_threads", "MeanFlowError",
    "__version__",
]  # fmt: skip

# Imported on first use, so that ``import meanflow`` stays light (no checkpoint, data or training
# modules): ``meanflow.fit(out, data=...)`` trains as ``meanflow train`` does,
# ``meanflow.load_run(run_dir)`` reads a ``meanflow train`` run back,
# ``meanflow.from_pretrained(dir)`` an exported model, ``meanflow.MeanFlowPipeline`` is the
# diffusers pipeline (needs diffusers).
_LAZY = {
    "fit": "meanflow.train.rundir",
    "load_run": "meanflow.runs.load",
    "TrainedRun": "meanflow.runs.run",
    "from_pretrained": "meanflow.runs.load",
    "MeanFlowPipeline": "meanflow.runs.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'meanflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
