"""The objectives by the names a configuration uses (``objective=...``, ``--objective``), and
how each is built: :data:`OBJECTIVES` maps a name to an :class:`Entry`, whose
:meth:`Entry.build` makes the objective from a time sampler, an optional guidance
(:class:`meanflow.objectives.guidance.Guidance`) and keyword options. ``meanflow.config``
builds a run's objective here (``build_objective``) and takes its list of names from here.

Adding an objective is one file and one line: write ``objectives/my_objective.py`` with a
subclass of :class:`MeanFlow` that changes its hooks and takes ``(time_sampler, *,
guidance=None, p, c, **jvp_options)``, then add ``"my-objective": Entry(MyObjective)`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MeanFlowError
from ..flow.times import TimeSampler
from .alphaflow import AlphaFlow, GuidedAlphaFlow
from .flow_matching import FlowMatching
from .guidance import Guidance, GuidedFlowMatching, GuidedMeanFlow
from .imf import GuidanceInputs, GuidanceInputsIMF, GuidedImprovedMeanFlow, ImprovedMeanFlow
from .meanflow import MeanFlow

JVP_OPTIONS = ("jvp", "jvp_dtype", "jvp_backend", "fd_step", "fd_scheme", "time_tangent")


@dataclass(frozen=True)
class Entry:
    """One objective of the registry.

    Attributes:
        objective: the class, built as ``objective(time_sampler, guidance=..., **options)``.
        guided: by the type of the guidance, the class a guided run gets instead, built as
            ``guided[type](num_classes, time_sampler, **guidance.arguments(), **options)``:
            the names of earlier releases (``GuidedMeanFlow``, ...), which logs and
            ``--dry-run`` print; the same objective. Empty (a new objective): ``objective``
            with the guidance.
        section: the configuration section holding the objective's own options (``"alpha"``:
            AlphaFlow's schedule), passed as keywords; None: no options of its own.
        jvp: whether it takes the JVP options (:data:`JVP_OPTIONS`); flow matching runs no JVP.
    """

    objective: type[MeanFlow]
    guided: dict[type[Guidance], Callable[..., MeanFlow]] = field(default_factory=dict)
    section: str | None = None
    jvp: bool = True

    def build(
        self, time_sampler: TimeSampler | None = None, guidance: Guidance | None = None, **options
    ) -> MeanFlow:
        """The objective, with ``guidance`` (None: unconditional) and keyword ``options``
        (``p``, ``c``, the JVP options, the section's); JVP options are dropped for an objective
        that takes none."""
        if not self.jvp:
            options = {k: v for k, v in options.items() if k not in JVP_OPTIONS}
        named = self.guided.get(type(guidance)) if guidance is not None else None
        if guidance is not None and named is not None:
            return named(guidance.num_classes, time_sampler, **guidance.arguments(), **options)
        return self.objective(time_sampler, guidance=guidance, **options)


OBJECTIVES: dict[str, Entry] = {
    "meanflow": Entry(MeanFlow, {Guidance: GuidedMeanFlow}),
    "flow-matching": Entry(FlowMatching, {Guidance: GuidedFlowMatching}, jvp=False),
    "imf": Entry(
        ImprovedMeanFlow, {Guidance: GuidedImprovedMeanFlow, GuidanceInputs: GuidanceInputsIMF}
    ),
    "alphaflow": Entry(AlphaFlow, {Guidance: GuidedAlphaFlow}, section="alpha"),
}


def objective_entry(name: str) -> Entry:
    """The registry's entry for ``name``; an unknown name is a :class:`MeanFlowError`."""
    if name not in OBJECTIVES:
        raise MeanFlowError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
