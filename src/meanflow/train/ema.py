"""Exponential moving averages (EMAs) of the weights; sampling uses the primary one by default.

A run keeps one or more averages of its parameters, each with its own decay ``d``: the primary,
named ``"ema"`` (``ema_decay``), and any extras (``ema_extra``), named ``"ema-<d>"``. They all
follow the same clock: :meth:`EMA.update` is called after every optimizer step, ``n`` counts
those steps, and every ``k = ema_every`` steps (at ``n = k, 2k, ...``) each average ``e`` takes
the current weights ``theta`` as

    e <- d_n^k * e + (1 - d_n^k) * theta

where ``d_n = min(d, (1 + m) / (10 + m))`` with ``m = n - k`` (the steps before this window)
under warm-up (``ema_warmup``), else ``d_n = d``. With ``k = 1`` and warm-up this is the usual
warm-up EMA; with constant decay, ``k`` steps give the old average the weight ``d^k`` that ``k``
single updates would, but only the weights at the end of the window are averaged in (the
weights of the ``k - 1`` steps between are skipped), which costs 1/k of the per-step work. This
is what the authors' PyTorch code does (py-meanflow ``models/ema.py``: constant decays 0.9999,
0.99995 and 0.9996, ``decay ** 16`` every 16 steps; it averages in float64, we in the
parameters' own dtype). Buffers (e.g. normalization statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import check
from ..runs.checkpoint import prefixed

PRIMARY = "ema"


def ema_name(decay: float) -> str:
    """The name of an extra average of decay ``decay``: ``"ema-0.99995"``."""
    return f"{PRIMARY}-{float(decay)!r}"


class EMA:
    """The named averages of ``model``'s parameters (see the module docstring).

    ``models[name]`` is each average's network (eval mode, no gradients); ``model`` the primary
    one; ``decays[name]`` its decay; ``updates`` the optimizer steps seen so far."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        extra: tuple[float, ...] = (),
        every: int = 1,
        warmup: bool = True,
    ) -> None:
        self.decays = {PRIMARY: float(decay), **{ema_name(d): float(d) for d in extra}}
        check(
            len(self.decays) == 1 + len(extra),
            f"EMA decays must differ, got {decay} and {', '.join(map(str, extra))}",
        )
        self.models = {
            name: copy.deepcopy(model).eval().requires_grad_(False) for name in self.decays
        }
        self._params: dict[str, list[torch.Tensor]] = {
            name: list(m.parameters()) for name, m in self.models.items()
        }
        self.every, self.warmup = int(every), bool(warmup)
        self.updates = 0

    @property
    def model(self) -> nn.Module:
        return self.models[PRIMARY]

    def factor(self, decay: float, n: int) -> float:
        """``d_n^k``: the weight the update at step ``n`` (a multiple of ``every``) gives the
        old average of decay ``decay``."""
        m = n - self.every
        d = min(decay, (1 + m) / (10 + m)) if self.warmup else decay
        return d**self.every

    def current_decay(self, name: str = PRIMARY) -> float:
        """The weight of the old average in the next averaging update of ``name``."""
        n = (self.updates // self.every + 1) * self.every
        return self.factor(self.decays[name], n)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one optimizer step of ``model``; average its weights in every ``every``-th."""
        self.updates += 1
        if self.updates % self.every:
            return
        params = [p.detach() for p in model.parameters()]
        buffers = list(model.buffers())
        for name, ema in self.models.items():
            weight = 1.0 - self.factor(self.decays[name], self.updates)
            torch._foreach_lerp_(self._params[name], params, weight)
            for b_ema, b in zip(ema.buffers(), buffers):
                b_ema.copy_(b)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every average's state as checkpoint tensors ``<name>.<key>`` (``ema.*``: primary)."""
        return {
            f"{name}.{k}": v for name, m in self.models.items() for k, v in m.state_dict().items()
        }

    def state(self) -> dict:
        """The checkpoint metadata: the step count and each average's decay by name."""
        return {"ema_updates": self.updates, "emas": dict(self.decays)}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what :meth:`tensors` and :meth:`state` saved."""
        for name, m in self.models.items():
            state = prefixed(tensors, name)
            check(
                bool(state),
                f"the checkpoint holds no EMA {name!r}; resume with the "
                "ema_decay and ema_extra it was trained with",
            )
            m.load_state_dict(state)
        self.updates = int(meta["ema_updates"])
