import math
import os

import pytest
import torch
from torch import nn

torch.set_num_threads(2)
# the CLI's --threads auto probes /proc/stat for 0.1 s per command; the tests fix the count
os.environ.setdefault("OMP_NUM_THREADS", "2")


class GaussianMeanFlow(nn.Module):
    """The exact average velocity of the linear path for data x ~ N(mu, sigma^2 I).

    With a = 1 - t and s_t^2 = a^2 sigma^2 + t^2, the flow is z_t = a mu + s_t xi, so
    u(z, r, t) = (z_t - z_r) / (t - r) = -mu + (1 - s_r / s_t) (z - (1 - t) mu) / (t - r),
    and the marginal velocity is v(z, t) = (t - a sigma^2) / s_t^2 (z - a mu) - mu.
    Defined for r < t (the formula divides by t - r).
    """

    def __init__(self, mu: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.sigma = sigma

    def s(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sigma ** 2 + t ** 2)

    def forward(self, z, r, t, y=None):
        r_, t_ = r[:, None], t[:, None]
        centered = z - (1 - t_) * self.mu
        return -self.mu + (1 - self.s(r_) / self.s(t_)) * centered / (t_ - r_)

    def velocity(self, z, t):
        t_ = t[:, None]
        a = 1 - t_
        return (t_ - a * self.sigma ** 2) / self.s(t_) ** 2 * (z - a * self.mu) - self.mu


@pytest.fixture
def gaussian_flow():
    return GaussianMeanFlow(torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64), sigma=0.7)


def logit(x):
    return torch.log(x) - torch.log1p(-x)


SQRT_PI = math.sqrt(math.pi)


def assert_jvp_modes_agree(make_objective, model, *args, **kwargs):
    """The loss and gradients of ``make_objective(jvp=mode)(model, *args, **kwargs)`` are the
    same for the ``full``, ``subset`` and ``detached`` JVP modes. ``generator_seed`` gives each
    mode a fresh generator with that seed."""
    seed = kwargs.pop("generator_seed", None)
    losses, grads = [], []
    for mode in ("full", "subset", "detached"):
        model.zero_grad()
        if seed is not None:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        out = make_objective(jvp=mode)(model, *args, **kwargs)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for other in (1, 2):
        assert torch.allclose(losses[0], losses[other], rtol=1e-12)
        assert torch.allclose(grads[0], grads[other], rtol=1e-9, atol=1e-12)


def assert_total_derivative_matches_fd(model, z, r, t, v, y=None, h=1e-5):
    """``total_derivative`` equals a float64 central difference along (v, 0, 1), and differs
    from the derivative along the wrong tangent (v, 1, 1), so the check can fail."""
    from meanflow.flow.jvp import total_derivative

    u, dudt = total_derivative(model, z, r, t, v, y)
    assert u.abs().mean() > 1e-2  # the network is not at its zero initialization
    fd = (model(z + h * v, r, t + h, y) - model(z - h * v, r, t - h, y)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-7, rtol=1e-6)
    assert torch.allclose(u, model(z, r, t, y))
    wrong = (model(z + h * v, r + h, t + h, y) - model(z - h * v, r - h, t - h, y)) / (2 * h)
    assert not torch.allclose(dudt, wrong, atol=1e-4)


def assert_meanflow_output_is_the_formula(model, out, x, noise, r, t, y=None, c=1e-3,
                                          h=1e-5):
    """For a deterministic ``model`` (no dropout) and ``out = MeanFlow()(model, x, y, noise=noise,
    r=r, t=t)`` not yet backpropagated, recomputed here independently of the objective:
    ``out.u`` is the network at ``z_t = (1 - t) x + t e``; ``out.target`` is ``v - (t - r) du/dt``
    with ``v = e - x`` and ``du/dt`` a float64 central difference along ``(v, 0, 1)`` (exactly
    ``v`` where ``r == t``); the loss is the mean of ``err / (err + c)`` (adaptive weight, p = 1);
    and ``out.loss.backward()`` gives the gradient of that loss with the target and the weight
    held constant (the stop-gradients of Eq. 10 and Sec. 4.3). Leaves ``model``'s gradients set."""
    import copy

    tb = t.view(-1, *[1] * (x.dim() - 1))
    z, v = (1 - tb) * x + tb * noise, noise - x
    torch.testing.assert_close(out.u, model(z, r, t, y), rtol=1e-5, atol=1e-5)
    m64 = copy.deepcopy(model).double()
    z64, v64, r64, t64 = z.double(), v.double(), r.double(), t.double()
    with torch.no_grad():
        fd = (m64(z64 + h * v64, r64, t64 + h, y) - m64(z64 - h * v64, r64, t64 - h, y)) / (2 * h)
    target = v64 - (t64 - r64).view_as(tb) * fd
    assert float((out.target.double() - v64).norm()) > 100 * float(
        (out.target.double() - target).norm())  # the du/dt term is seen, not lost in the error
    torch.testing.assert_close(out.target.double(), target, rtol=1e-4, atol=1e-4)
    same = r == t
    assert same.any() and torch.equal(out.target[same], v[same])
    err = (out.u.detach() - target.float()).pow(2).flatten(1).sum(dim=1)
    torch.testing.assert_close(out.err, err, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), (err / (err + c)).mean(), rtol=1e-5, atol=0)
    model.zero_grad()
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    u = model(z, r, t, y)
    sq = (u - out.target).pow(2).flatten(1).sum(dim=1)
    (sq / (sq.detach() + c)).mean().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 50-step run of the ``tiny`` preset on eight Gaussians (one per test module)."""
    from meanflow.cli import main

    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    assert main(["train", "--data", "eight-gaussians", "--out", out, "--preset", "tiny",
                 "--quiet"]) == 0
    return out


def perturbed(model, scale: float = 0.05):
    """``model`` with N(0, scale) added to every parameter (in place), so that zero- or
    near-zero-initialised output layers do not hide any path through the network."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def jvp_inputs(shape: tuple[int, ...], b: int, dtype=torch.float64, seed: int = 0):
    """Seeded ``(z, r, t, v)`` for a JVP check: ``t`` in [0.15, 0.95], ``0 <= r <= t``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, *shape, generator=g, dtype=dtype)
    v = torch.randn(b, *shape, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.8 + 0.15
    r = t * torch.rand(b, generator=g, dtype=dtype)
    return z, r, t, v, g
