"""Training objectives, each a callable ``objective(model, x, y=None, ...) -> ObjectiveOutput``
that knows nothing about the network: MeanFlow (meanflow.py), flow matching (flow_matching.py),
improved MeanFlow (imf.py) and AlphaFlow (alphaflow.py), each a subclass of :class:`MeanFlow`
that changes its hooks (``velocity``, ``draw_times``, ``tangent``, ``prediction_and_target``,
``row_scale``, ``at_step``). Classifier-free guidance is a part an objective holds, not a
subclass: ``MeanFlow(..., guidance=Guidance(10, omega=1.0, kappa=0.5))`` (guidance.py; with the
scale as a network input, ``GuidanceInputs`` in imf.py). ``GuidedMeanFlow``,
``GuidedFlowMatching``, ``GuidedImprovedMeanFlow``, ``GuidanceInputsIMF`` and
``GuidedAlphaFlow`` build those composed objectives under the names of earlier releases.

registry.py names them for configurations (``objective=meanflow | flow-matching | imf |
alphaflow``). Adding an objective is one file plus one registry line: a module with the
subclass, and ``"name": Entry(TheClass)`` in ``registry.OBJECTIVES``; the configuration, the
``--objective`` choices and guidance then come with it.

Layer: imports ``meanflow.flow`` and ``meanflow.errors`` (and ``meanflow.nn``'s forward-mode
helpers through them); never a network, data, run or training module.
"""

from .alphaflow import AlphaFlow, GuidedAlphaFlow
from .flow_matching import FlowMatching
from .guidance import Guidance, GuidedFlowMatching, GuidedMeanFlow, sampling_guidance
from .imf import GuidanceInputs, GuidanceInputsIMF, GuidedImprovedMeanFlow, ImprovedMeanFlow
from .meanflow import MeanFlow, ObjectiveOutput
from .registry import OBJECTIVES, Entry, objective_entry

__all__ = [
    "MeanFlow", "FlowMatching", "ObjectiveOutput", "Guidance", "GuidanceInputs",
    "GuidedMeanFlow", "GuidedFlowMatching", "sampling_guidance", "ImprovedMeanFlow",
    "GuidedImprovedMeanFlow", "GuidanceInputsIMF", "AlphaFlow", "GuidedAlphaFlow",
    "OBJECTIVES", "Entry", "objective_entry",
]  # fmt: skip
