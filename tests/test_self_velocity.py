"""``loss.self_velocity``: the network's own velocity in the r != t rows' tangent and target.

With ``beta = 1`` the target of an r != t row is ``sg(v_hat - (t - r) du/dt)`` along
``(v_hat, 0, 1)``, ``v_hat = u(z, t, t)``: it depends on the data only through the network, so
at the exact solution it equals ``u*`` row by row, whatever the data point behind ``z`` was
(with ``beta = 0``, MeanFlow, only its expectation does). Closed form: the Gaussian case of
tests/test_imf_alphaflow.py."""

import pytest
import torch
from test_imf_alphaflow import GaussianAverageVelocity, marginal_velocity

from meanflow import MeanFlow, TimeSampler
from meanflow.config import TrainConfig
from meanflow.config.build import build_objective
from meanflow.errors import MeanFlowError
from meanflow.objectives.imf import ImprovedMeanFlow


def _batch(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.rand(n, d, generator=g, dtype=torch.float64) - 1  # any data, not Gaussian
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    r[::4] = t[::4]  # a quarter of the rows r = t
    return x, e, r, t


@pytest.mark.parametrize("jvp", ["subset", "full", "detached"])
def test_full_self_velocity_target_is_the_exact_solution_row_by_row(jvp):
    x, e, r, t = _batch()
    model = GaussianAverageVelocity()
    out = MeanFlow(TimeSampler(), p=0.0, jvp=jvp, self_velocity=1.0)(model, x, noise=e, r=r, t=t)
    z = (1 - t)[:, None] * x + t[:, None] * e
    distinct = r < t
    assert torch.allclose(out.target[distinct], model(z, r, t)[distinct], atol=1e-9)
    assert out.err[distinct].abs().max() < 1e-15
    assert torch.allclose(out.target[~distinct], (e - x)[~distinct])  # r = t rows: v itself
    # MeanFlow's target is one noisy sample of u*: far from it row by row
    plain = MeanFlow(TimeSampler(), p=0.0, jvp=jvp)(model, x, noise=e, r=r, t=t)
    assert (plain.target - out.target)[distinct].abs().max() > 0.1


def test_target_is_affine_in_beta_and_beta_zero_is_meanflow():
    """The target is affine in the velocity (tangent and value), so beta = 0.5 is the mean of
    beta = 0 and beta = 1; beta = 0 is MeanFlow bit for bit; r = t rows keep v for every beta."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3))
    net = net.double()

    def model(z, r, t, y=None):
        return net(torch.cat([z, r[:, None], t[:, None]], 1))

    x, e, r, t = _batch(seed=1)

    def target(beta):
        obj = MeanFlow(TimeSampler(), self_velocity=beta)
        return obj(model, x, noise=e, r=r, t=t).target

    t0, t1, half = target(0.0), target(1.0), target(0.5)
    assert torch.allclose(half, (t0 + t1) / 2, atol=1e-12)
    assert torch.equal(t0, MeanFlow(TimeSampler())(model, x, noise=e, r=r, t=t).target)
    flat = r == t
    for tgt in (t0, t1, half):
        assert torch.equal(tgt[flat], (e - x)[flat])
    z = (1 - t)[:, None] * x + t[:, None] * e
    with torch.no_grad():
        v_hat = model(z, t, t)
    distinct = ~flat
    _, dudt = torch.func.jvp(model, (z[distinct], r[distinct], t[distinct]),
                             (v_hat[distinct], torch.zeros_like(r[distinct]),
                              torch.ones_like(t[distinct])))
    expected = v_hat[distinct] - (t - r)[distinct][:, None] * dudt
    assert torch.allclose(t1[distinct], expected, atol=1e-12)


def test_imf_with_full_self_velocity_equals_meanflow_with_it():
    """iMF already uses v_hat as tangent; with beta = 1 the target's velocity is v_hat too,
    so the two objectives coincide."""
    x, e, r, t = _batch(seed=2)
    model = GaussianAverageVelocity()
    a = MeanFlow(TimeSampler(), self_velocity=1.0)(model, x, noise=e, r=r, t=t)
    b = ImprovedMeanFlow(TimeSampler(), self_velocity=1.0)(model, x, noise=e, r=r, t=t)
    assert torch.allclose(a.target, b.target, atol=1e-12)
    assert torch.allclose(a.target[r < t],
                          GaussianAverageVelocity()(
                              (1 - t)[:, None] * x + t[:, None] * e, r, t)[r < t], atol=1e-9)
    assert torch.allclose(marginal_velocity((1 - t)[:, None] * x + t[:, None] * e, t)[r == t],
                          model((1 - t)[:, None] * x + t[:, None] * e, t, t)[r == t])


@pytest.mark.parametrize("objective", ["meanflow", "imf", "alphaflow"])
def test_config_passes_self_velocity_and_refuses_out_of_range(objective):
    cfg = TrainConfig(objective=objective)
    cfg.loss.self_velocity = 0.25
    cfg.validate()
    assert build_objective(cfg).self_velocity == 0.25
    cfg.loss.self_velocity = 1.5
    with pytest.raises(MeanFlowError, match="loss.self_velocity must be in"):
        cfg.validate()
    with pytest.raises(MeanFlowError, match="self_velocity must be in"):
        MeanFlow(self_velocity=-0.1)
