"""Training objectives, each a callable ``objective(model, x, y=None, ...) -> ObjectiveOutput``
that knows nothing about the network: MeanFlow and flow matching (meanflow.py), guidance folded
into the target (guidance.py), improved MeanFlow (imf.py) and AlphaFlow (alphaflow.py).

Layer: imports ``meanflow.flow`` and ``meanflow.errors`` (and ``meanflow.nn``'s forward-mode
helpers through them); never a network, data, run or training module.
"""

from .alphaflow import AlphaFlow, GuidedAlphaFlow
from .guidance import GuidedFlowMatching, GuidedMeanFlow, sampling_guidance
from .imf import GuidanceInputsIMF, GuidedImprovedMeanFlow, ImprovedMeanFlow
from .meanflow import FlowMatching, MeanFlow, ObjectiveOutput

__all__ = [
    "MeanFlow", "FlowMatching", "ObjectiveOutput", "GuidedMeanFlow", "GuidedFlowMatching",
    "sampling_guidance", "ImprovedMeanFlow", "GuidedImprovedMeanFlow", "GuidanceInputsIMF",
    "AlphaFlow", "GuidedAlphaFlow",
]  # fmt: skip
