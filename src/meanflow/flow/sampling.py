"""One-step and few-step sampling (paper Algorithm 2, Eq. 12).

Over a decreasing schedule ``1 = s_0 > s_1 > ... > s_K = 0`` each step applies

    z_r = z_t - (t - r) * u(z_t, r, t),      (t, r) = (s_k, s_{k+1})

so one step is ``x = e - u(e, 0, 1)``. For a flow-matching model (``u = v``) the same update is
the Euler method.
"""

from __future__ import annotations

import torch

from ..errors import MeanFlowError, check


def uniform_schedule(steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``steps + 1`` times evenly spaced from 1 down to 0."""
    check(
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
        f"steps must be an integer >= 1, got {steps!r}",
    )
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).to(dtype)


def parse_schedule(text: str | None) -> list[float] | None:
    """``--schedule`` text such as ``1,0.6,0`` as a list of times (None stays None)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MeanFlowError(f"--schedule expects comma-separated numbers, got {text!r}") from None


def validate_schedule(schedule) -> torch.Tensor:
    """Return ``schedule`` as a float tensor after checking it is a strictly decreasing 1-D
    sequence of at least two times in [0, 1]."""
    s = torch.as_tensor(schedule, dtype=torch.float64)
    check(
        s.dim() == 1 and s.numel() >= 2,
        f"a schedule needs at least two times in a 1-D sequence, got shape {tuple(s.shape)}",
    )
    check(bool(torch.isfinite(s).all()), "schedule times must be finite")
    check(bool(((s >= 0) & (s <= 1)).all()), "schedule times must lie in [0, 1]")
    check(
        bool((s[1:] < s[:-1]).all()),
        f"a schedule must be strictly decreasing (from noise at 1 to data at 0), got {s.tolist()}",
    )
    return s


@torch.no_grad()
def sample(
    model, noise: torch.Tensor, steps: int = 1, schedule=None, y: torch.Tensor | None = None
) -> torch.Tensor:
    """Map ``noise`` (the state at time ``schedule[0]``, normally 1) to samples.

    Args:
        model: any callable ``model(z, r, t, y=None)`` returning the average velocity.
        noise: (B, ...) starting state.
        steps: number of uniform steps, used when ``schedule`` is None.
        schedule: explicit decreasing times, e.g. ``[1.0, 0.5, 0.0]``.
        y: optional labels passed to the model.
    """
    s = uniform_schedule(steps, torch.float64) if schedule is None else validate_schedule(schedule)
    s = s.to(device=noise.device, dtype=noise.dtype)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        z = noise
        b = noise.shape[0]
        for t_val, r_val in zip(s[:-1], s[1:]):
            t = t_val.expand(b)
            r = r_val.expand(b)
            u = model(z, r, t, y=y)
            z = z - (t_val - r_val).to(z.dtype) * u.to(z.dtype)
        return z
    finally:
        if was_training:
            model.train()
