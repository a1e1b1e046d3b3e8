"""Classifier-free guidance folded into the MeanFlow training target (paper Sec. 4.2, appendix).

A class-conditional network ``u(z, r, t | y)`` has a null label at index ``num_classes``. During
training a fraction ``label_dropout`` of the labels is replaced by the null label; the network
sees the dropped labels both for ``u`` and for the JVP. As in the authors' code, the dropped rows
are r = t rows (``drop_rows="r=t"``: the number dropped is Binomial(B, label_dropout), chosen at
random among the batch's r = t rows); ``drop_rows="any"`` drops each row independently. The
conditional velocity ``v`` is replaced by the guided velocity (the "improved CFG" of the appendix)

    v~ = omega * v + (1 - omega - kappa) * u(z_t, t, t | null) + kappa * u(z_t, t, t | y)

where both network terms are evaluated with r = t (the instantaneous velocity), are
stop-gradients, and run in evaluation mode (no dropout), as the authors' ``train=False``.
``v~`` is then used exactly where ``v`` was: as the JVP tangent ``(v~, 0, 1)`` and in the
target ``u_tgt = sg(v~ - (t - r) du/dt)``. It applies only to samples whose ``t`` lies in the
closed interval ``[t_min, t_max]`` and whose label was not dropped; elsewhere
``v~ = v`` (so the null label learns the unconditional field).

At the fixed point ``u(z, t, t | y) = u_cfg`` and ``u(z, t, t | null) = v_uncond``, so

    u_cfg = w' v_cond + (1 - w') v_uncond,      w' = omega / (1 - kappa)    (``effective_scale``)

i.e. ordinary CFG with scale ``w'``, baked into the one-step model: sampling needs no extra
evaluation. ``kappa = 0`` is the plain form of Sec. 4.2 (``v~ = omega v + (1 - omega) u_null``).

Paper settings (ImageNet 256): B/2 omega = 1.0, kappa = 0.5 (w' = 2.0); XL/2
omega = 0.2, kappa = 0.92 (w' = 2.5) with guidance interval t in [0, 0.75]; label dropout 10%.

:class:`Guidance` is this part; an objective holds it (``MeanFlow(...,
guidance=Guidance(...))``, any objective the same way) and calls it for the label dropout and
``v~``. :class:`GuidedMeanFlow` and :class:`GuidedFlowMatching` build such objectives under
their earlier names and signatures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import check
from ..flow.jvp import at_least_float32
from ..flow.path import PathSample
from ..flow.times import TimeSampler
from .flow_matching import FlowMatching
from .meanflow import MeanFlow
from .rows import Draws, _sub, evaluation_mode, rows_first

GUIDANCE_ARGUMENTS = ("omega", "kappa", "t_min", "t_max", "label_dropout", "drop_rows")


class Guidance:
    """Classifier-free guidance in the target, the part an objective holds
    (``MeanFlow(..., guidance=Guidance(10, omega=1.0, kappa=0.5))``): label dropout before the
    loss (:meth:`prepare`, :meth:`draw`) and the guided velocity ``v~`` (:meth:`velocity`).

    Args:
        num_classes: number of real classes; the null label is ``num_classes``.
        omega, kappa: guidance weights (``omega > 0``, ``kappa < 1``; the paper uses
            ``0 <= kappa < 1``); effective CFG scale ``omega / (1 - kappa)``. ``omega = 1,
            kappa = 0`` is unguided: ``v~ = v`` and no extra network evaluations.
        t_min, t_max: guidance is applied for ``t_min <= t <= t_max`` only.
        label_dropout: fraction of labels replaced by the null label, drawn from the call's
            ``generator`` (no draw at all when it is 0).
        drop_rows: ``"r=t"`` (the authors'): Binomial(B, label_dropout) rows are dropped, chosen
            among the r = t rows (all of them if there are fewer); ``"any"``: each row
            independently with probability ``label_dropout``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        omega: float = 1.0,
        kappa: float = 0.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        label_dropout: float = 0.1,
        drop_rows: str = "r=t",
    ) -> None:
        check(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
        check(omega > 0, f"guidance omega must be > 0, got {omega}")
        check(kappa < 1, f"guidance kappa must be < 1, got {kappa}")
        check(
            0 <= t_min <= t_max <= 1,
            f"guidance interval must satisfy 0 <= t_min <= t_max <= 1, got [{t_min}, {t_max}]",
        )
        check(0 <= label_dropout <= 1, f"label dropout must be in [0, 1], got {label_dropout}")
        check(drop_rows in ("r=t", "any"), f"drop_rows must be 'r=t' or 'any', got {drop_rows!r}")
        self.drop_rows = drop_rows
        self.num_classes, self.omega, self.kappa = int(num_classes), float(omega), float(kappa)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.label_dropout = float(label_dropout)

    def arguments(self) -> dict:
        """The keyword arguments that build this guidance again (besides ``num_classes``)."""
        return {name: getattr(self, name) for name in GUIDANCE_ARGUMENTS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments().items())
        return f"{type(self).__name__}({self.num_classes}, {args})"

    @property
    def effective_scale(self) -> float:
        """The CFG scale the trained one-step model realises: ``omega / (1 - kappa)``."""
        return self.omega / (1 - self.kappa)

    @property
    def guided(self) -> bool:
        """False when ``omega = 1, kappa = 0``: then ``v~ = v`` and the network is not called."""
        return not (self.omega == 1 and self.kappa == 0)

    # -- label dropout ---------------------------------------------------------------------
    def drop_labels(
        self, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace each label by the null label with probability ``label_dropout``."""
        return self.apply_drop(y, self.drop_mask(y.shape[0], generator, y.device))

    def drop_mask(
        self,
        n: int,
        generator,
        device,
        r: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Which of ``n`` labels become the null label (None when ``label_dropout`` is 0):
        each independently, or with ``r``, ``t`` given and ``drop_rows="r=t"``,
        Binomial(n, label_dropout) of them chosen at random among the rows with r = t."""
        if self.label_dropout == 0:
            return None
        coin = torch.rand(n, generator=generator, device=device) < self.label_dropout
        if self.drop_rows == "any" or r is None:
            return coin
        assert t is not None  # r and t are given together
        order = torch.rand(n, generator=generator, device=device)
        order = torch.where(r == t, order, torch.full_like(order, 2.0))  # r != t rows last
        rank = torch.empty(n, dtype=torch.long, device=device)
        rank[torch.argsort(order)] = torch.arange(n, device=device)
        return (rank < coin.sum()) & (r == t)

    def apply_drop(self, y: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """``y`` with the labels where ``drop`` is true replaced by the null label."""
        return y if drop is None else torch.where(drop, torch.full_like(y, self.num_classes), y)

    def draw(self, n: int, generator, device, rest: Callable[[], Draws]) -> Draws:
        """The objective's draws ``rest()`` (noise, times) with the label-dropout mask: drawn
        before them for ``drop_rows="any"``, after them for ``"r=t"`` (it depends on them)."""
        first = self.drop_mask(n, generator, device) if self.drop_rows == "any" else None
        draws = rest()
        draws.drop = (
            first
            if self.drop_rows == "any"
            else self.drop_mask(n, generator, device, draws.r, draws.t)
        )
        return draws

    # -- before the loss -------------------------------------------------------------------
    def prepare(self, objective: MeanFlow, x, y, noise, r, t, generator, drop, guide, cond):
        """``(y, noise, r, t, cond)`` for the loss: the labels checked and dropped (``drop``
        from :meth:`draw`, drawn here when absent; every draw of ``objective`` when none is
        given). ``guide`` belongs to guidance inputs only."""
        check(guide is None, "guide (per-row guidance inputs) needs guidance.inputs=true")
        y, noise, r, t = self.dropped_labels(objective, x, y, noise, r, t, generator, drop)
        return y, noise, r, t, cond

    def dropped_labels(self, objective: MeanFlow, x, y, noise, r, t, generator, drop):
        """``(y with its dropped labels, noise, r, t)`` (:meth:`prepare`)."""
        check(y is not None, "guided MeanFlow needs class labels y (shape (B,), dtype long)")
        assert y is not None  # check() raised otherwise
        check(
            isinstance(y, torch.Tensor) and y.dtype == torch.long,
            f"labels y must be a torch.long tensor, got {getattr(y, 'dtype', type(y).__name__)}",
        )
        check(
            x.dim() >= 1 and tuple(y.shape) == (x.shape[0],),
            f"labels y must have shape (B,) = ({x.shape[0] if x.dim() else '?'},), "
            f"got {tuple(y.shape)}",
        )
        check(
            not objective.check_inputs or bool(((y >= 0) & (y <= self.num_classes)).all()),
            f"labels y must lie in [0, {self.num_classes}] ({self.num_classes} = null label)",
        )
        if drop is None and noise is None and r is None and t is None:
            d = objective.draw(
                x.shape[0], tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype
            )
            noise, r, t, drop = d.noise, d.r, d.t, d.drop
        elif drop is None:
            drop = self.drop_mask(x.shape[0], generator, x.device, r, t)
        check(
            drop is None or tuple(drop.shape) == (x.shape[0],),
            f"drop mask must have shape ({x.shape[0]},), got {tuple(getattr(drop, 'shape', ()))}",
        )
        return self.apply_drop(y, drop), noise, r, t

    # -- the guided velocity ---------------------------------------------------------------
    def velocity(
        self, model, path: PathSample, t: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        """The guided velocity ``v~`` (module docstring); ``y`` is already dropped."""
        v = path.v
        if not self.guided:
            return v
        mask = (t >= self.t_min) & (t <= self.t_max) & (y != self.num_classes)
        count, order = rows_first(mask)
        if count == 0:
            return v
        assert y is not None  # guided objectives always pass labels (checked in prepare)
        idx = order[:count]
        z, ti, yi = path.z[idx], t[idx], y[idx]
        null = torch.full_like(yi, self.num_classes)
        out = at_least_float32(v).clone()
        with torch.no_grad(), evaluation_mode(model):
            if self.kappa != 0:  # both terms in one call
                tt = torch.cat([ti, ti])
                twice = _sub(model, torch.cat([idx, idx]))
                u_null, u_cond = twice(torch.cat([z, z]), tt, tt, y=torch.cat([null, yi])).chunk(2)
                guide = (1 - self.omega - self.kappa) * u_null.to(
                    out.dtype
                ) + self.kappa * u_cond.to(out.dtype)
            else:
                guide = (1 - self.omega) * _sub(model, idx)(z, ti, ti, y=null).to(out.dtype)
        out[idx] = self.omega * out[idx] + guide
        return out

    def velocity_model(self, model, t: torch.Tensor):
        """The network whose ``u(z, t, t | y)`` is the model's own velocity at ``z`` (iMF's
        tangent): ``model`` itself here."""
        return model


# -- the classes of earlier releases: the composed objectives under their names ---------------
def guidance_from(num_classes: int, options: dict) -> Guidance:
    """A :class:`Guidance` from the guidance keywords in ``options`` (taken out of it)."""
    return Guidance(num_classes, **{k: options.pop(k) for k in GUIDANCE_ARGUMENTS if k in options})


def guidance_attribute(objective: MeanFlow, name: str):
    """``__getattr__`` of the guided classes: their guidance's attributes (``omega``,
    ``effective_scale``, ``drop_labels``, ...) read through, as when they were their own."""
    guidance = objective.__dict__.get("guidance")
    if guidance is None or name.startswith("__"):
        raise AttributeError(f"{type(objective).__name__!r} object has no attribute {name!r}")
    return getattr(guidance, name)


def set_guidance_attribute(objective: MeanFlow, name: str, value) -> None:
    """``__setattr__`` of the guided classes: a guidance setting (``objective.omega = 2.0``)
    is set on their guidance, as when it was their own; anything else on the objective."""
    guidance = objective.__dict__.get("guidance")
    if guidance is not None and name in vars(guidance):
        setattr(guidance, name, value)
    else:
        object.__setattr__(objective, name, value)


class GuidedMeanFlow(MeanFlow):
    """MeanFlow with classifier-free guidance in the target: ``MeanFlow(time_sampler,
    guidance=Guidance(num_classes, omega=..., ...), ...)`` under the name and signature of
    earlier releases. ``y`` is required; the :class:`Guidance` attributes (``omega``,
    ``effective_scale``, ``drop_labels``, ...) read and set through.

    Args:
        num_classes, omega, kappa, t_min, t_max, label_dropout, drop_rows: :class:`Guidance`.
        time_sampler, options (p, c, jvp, jvp_dtype, jvp_backend, ...): :class:`MeanFlow`.
    """

    def __init__(
        self,
        num_classes: int,
        time_sampler: TimeSampler | None = None,
        *,
        omega: float = 1.0,
        kappa: float = 0.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        label_dropout: float = 0.1,
        drop_rows: str = "r=t",
        **options,
    ) -> None:
        guidance = Guidance(
            num_classes,
            omega=omega,
            kappa=kappa,
            t_min=t_min,
            t_max=t_max,
            label_dropout=label_dropout,
            drop_rows=drop_rows,
        )
        super().__init__(time_sampler, guidance=guidance, **options)

    __getattr__ = guidance_attribute
    __setattr__ = set_guidance_attribute


class GuidedFlowMatching(FlowMatching):
    """Class-conditional flow matching (r = t, one time draw) with the label dropout and guided
    velocity ``v~`` of :class:`GuidedMeanFlow`, the baseline to compare it with:
    ``FlowMatching(time_sampler, guidance=Guidance(num_classes, ...))``. Keywords as
    :class:`GuidedMeanFlow` (``jvp`` is ignored: no JVP runs)."""

    def __init__(
        self, num_classes: int, time_sampler: TimeSampler | None = None, **options
    ) -> None:
        options.pop("jvp", None)
        guidance = guidance_from(num_classes, options)
        super().__init__(time_sampler, guidance=guidance, **options)

    __getattr__ = guidance_attribute
    __setattr__ = set_guidance_attribute


def sampling_guidance(model, scale: float, num_classes: int):
    """Classifier-free guidance at sampling time, for any class-conditional ``model``:

        u_w(z, r, t | y) = u(z, r, t | null) + w * (u(z, r, t | y) - u(z, r, t | null))

    evaluated as one batched call on ``2B`` inputs (two network evaluations per step). On a
    model trained with guidance folded in (scale ``w'``, see :class:`GuidedMeanFlow`) the
    sampled field has CFG scale ``w * w'`` where the training guidance applied; ``w = 1``
    returns ``model`` itself (the one-evaluation sampler of the paper).
    """
    check(scale >= 0, f"sampling guidance must be >= 0, got {scale}")
    check(num_classes >= 1, "sampling guidance needs a class-conditional model")
    if scale == 1:
        return model

    def guided(z, r, t, y=None):
        check(y is not None, "sampling guidance needs class labels (not the null label)")
        null = torch.full_like(y, num_classes)
        u = model(torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), y=torch.cat([y, null]))
        cond, uncond = u.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided
