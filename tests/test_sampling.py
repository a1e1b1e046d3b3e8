import pytest
import torch

from meanflow import MeanFlowError, sample, uniform_schedule
from meanflow.nn import MLP


def _model():
    torch.manual_seed(0)
    return MLP(2, hidden=16, depth=2).double()


def test_one_step_is_noise_minus_average_velocity():
    model = _model()
    e = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = e - model(e, torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(sample(model, e, steps=1), expected, atol=1e-12)


def test_two_step_schedule_applies_update_twice():
    model = _model()
    e = torch.randn(6, 2, dtype=torch.float64)
    ones = torch.ones(6, dtype=torch.float64)
    z = e - 0.7 * model(e, 0.3 * ones, ones)
    z = z - 0.3 * model(z, 0 * ones, 0.3 * ones)
    assert torch.allclose(sample(model, e, schedule=[1.0, 0.3, 0.0]), z, atol=1e-12)


def test_exact_mean_flow_is_consistent_across_step_counts(gaussian_flow):
    """For the true average velocity every schedule lands on mu + sigma * e."""
    e = torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = gaussian_flow.mu + gaussian_flow.sigma * e
    for steps in (1, 2, 5):
        assert torch.allclose(sample(gaussian_flow, e, steps=steps), target, atol=1e-10)


def test_euler_with_marginal_velocity_converges(gaussian_flow):
    """A flow-matching model (u = v, r ignored) sampled with many steps is the Euler method."""

    class Velocity(torch.nn.Module):
        def forward(self, z, r, t, y=None):
            return gaussian_flow.velocity(z, t)

    e = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = gaussian_flow.mu + gaussian_flow.sigma * e
    err_10 = (sample(Velocity(), e, steps=10) - target).abs().max()
    err_200 = (sample(Velocity(), e, steps=200) - target).abs().max()
    assert err_200 < 0.03 and err_200 < err_10 / 10  # first-order convergence


def test_uniform_schedule_and_mode_restored():
    assert torch.allclose(uniform_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    model = _model().train()
    sample(model, torch.randn(3, 2, dtype=torch.float64))
    assert model.training


@pytest.mark.parametrize("schedule", [[1.0], [0.0, 1.0], [1.0, 1.0, 0.0], [1.5, 0.0],
                                      [1.0, -0.1], [1.0, float("nan"), 0.0], [[1.0, 0.0]]])
def test_bad_schedules_are_rejected(schedule):
    with pytest.raises(MeanFlowError):
        sample(_model(), torch.randn(2, 2, dtype=torch.float64), schedule=schedule)


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_bad_step_counts_are_rejected(steps):
    with pytest.raises(MeanFlowError):
        sample(_model(), torch.randn(2, 2, dtype=torch.float64), steps=steps)
