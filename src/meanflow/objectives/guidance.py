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
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import check
from ..flow.jvp import at_least_float32
from ..flow.path import PathSample
from ..flow.times import TimeSampler
from .meanflow import Draws, MeanFlow, ObjectiveOutput, SingleTime, _sub, rows_first


class GuidedMeanFlow(MeanFlow):
    """MeanFlow with classifier-free guidance in the target. ``y`` is required.

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
        time_sampler, p, c, jvp, jvp_dtype: as in :class:`MeanFlow`; ``jvp_options``
            (``jvp_backend``, ``fd_step``, ``fd_scheme``) are passed to it.
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
        p: float = 1.0,
        c: float = 1e-3,
        jvp: str = "subset",
        jvp_dtype: str = "float32",
        **jvp_options,
    ) -> None:
        super().__init__(time_sampler, p=p, c=c, jvp=jvp, jvp_dtype=jvp_dtype, **jvp_options)
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

    @property
    def effective_scale(self) -> float:
        """The CFG scale the trained one-step model realises: ``omega / (1 - kappa)``."""
        return self.omega / (1 - self.kappa)

    @property
    def guided(self) -> bool:
        """False when ``omega = 1, kappa = 0``: then ``v~ = v`` and the network is not called."""
        return not (self.omega == 1 and self.kappa == 0)

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

    def draw(
        self,
        n: int,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Draws:
        """As :meth:`MeanFlow.draw`, with the label-dropout mask: drawn first for
        ``drop_rows="any"``, after the times for ``"r=t"`` (it depends on them)."""
        first = self.drop_mask(n, generator, device) if self.drop_rows == "any" else None
        draws = super().draw(n, shape, generator=generator, device=device, dtype=dtype)
        draws.drop = (
            first
            if self.drop_rows == "any"
            else self.drop_mask(n, generator, device, draws.r, draws.t)
        )
        return draws

    def __call__(
        self,
        model,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
    ) -> ObjectiveOutput:
        """``drop``: the label-dropout mask from :meth:`draw`, drawn here when absent;
        ``cond``: as in :meth:`MeanFlow.__call__`."""
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
            not self.check_inputs or bool(((y >= 0) & (y <= self.num_classes)).all()),
            f"labels y must lie in [0, {self.num_classes}] ({self.num_classes} = null label)",
        )
        if drop is None and noise is None and r is None and t is None:
            d = self.draw(
                x.shape[0], tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype
            )
            noise, r, t, drop = d.noise, d.r, d.t, d.drop
        elif drop is None:
            drop = self.drop_mask(x.shape[0], generator, x.device, r, t)
        check(
            drop is None or tuple(drop.shape) == (x.shape[0],),
            f"drop mask must have shape ({x.shape[0]},), got {tuple(getattr(drop, 'shape', ()))}",
        )
        return self._loss(model, x, self.apply_drop(y, drop), noise, r, t, generator, cond)

    def velocity(
        self, model, path: PathSample, r: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        """The guided velocity ``v~`` (see the module docstring); ``y`` is already dropped."""
        v = path.v
        if not self.guided:
            return v
        mask = (t >= self.t_min) & (t <= self.t_max) & (y != self.num_classes)
        count, order = rows_first(mask)
        if count == 0:
            return v
        assert y is not None  # guided objectives always pass labels (checked in __call__)
        idx = order[:count]
        z, ti, yi = path.z[idx], t[idx], y[idx]
        null = torch.full_like(yi, self.num_classes)
        out = at_least_float32(v).clone()
        with torch.no_grad(), _evaluation_mode(model):
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


@contextmanager
def _evaluation_mode(model):
    """``model`` in eval mode (no dropout) for the guidance terms, as the authors' train=False;
    every submodule's own mode is restored afterwards. Plain callables pass through."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class GuidedFlowMatching(SingleTime, GuidedMeanFlow):
    """Class-conditional flow matching (r = t, one time draw) with the same label dropout and
    guided velocity ``v~`` as :class:`GuidedMeanFlow`: the baseline to compare it with."""

    def __init__(self, num_classes: int, time_sampler: TimeSampler | None = None, **kwargs) -> None:
        kwargs.pop("jvp", None)
        super().__init__(num_classes, time_sampler, **kwargs)


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
