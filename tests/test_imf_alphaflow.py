"""Improved MeanFlow and AlphaFlow: targets against hand computations and closed forms.

The Gaussian case: for data x ~ N(mu, sigma^2 I) the flow of z_t = (1 - t) x + t e moves
z_t = m(t) + s(t) xi with m(t) = (1 - t) mu and s(t)^2 = (1 - t)^2 sigma^2 + t^2, so the exact
average velocity is u*(z, r, t) = (z - z_r) / (t - r), z_r = m(r) + s(r) / s(t) (z - m(t)),
and the marginal velocity is v*(z, t) = -mu + s'(t) / s(t) (z - m(t))."""

import math

import pytest
import torch

from meanflow import MeanFlow, TimeSampler
from meanflow.objectives.alphaflow import AlphaFlow, alpha_schedule
from meanflow.objectives.imf import ImprovedMeanFlow
from meanflow.train import TrainConfig, configure, load_run, train

MU, SIGMA = 0.7, 0.5


def _m(t):
    return (1 - t) * MU


def _s(t):
    return torch.sqrt((1 - t) ** 2 * SIGMA ** 2 + t ** 2)


def marginal_velocity(z, t):
    ds = (-(1 - t) * SIGMA ** 2 + t) / _s(t)
    return -MU + (ds / _s(t))[:, None] * (z - _m(t)[:, None])


class GaussianAverageVelocity(torch.nn.Module):
    """The exact u*(z, r, t) of the Gaussian case (the marginal velocity where r = t)."""

    def forward(self, z, r, t, y=None):
        zr = _m(r)[:, None] + (_s(r) / _s(t))[:, None] * (z - _m(t)[:, None])
        gap = (t - r).clamp_min(1e-12)[:, None]
        return torch.where((t > r)[:, None], (z - zr) / gap, marginal_velocity(z, t))


def _gaussian_batch(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z, r, t


def test_gaussian_average_velocity_satisfies_the_meanflow_identity():
    """Sanity of the closed form itself: u* = v* - (t - r) d/dt u* along the true flow."""
    z, r, t = _gaussian_batch()
    model = GaussianAverageVelocity()
    v = marginal_velocity(z, t)
    u, dudt = torch.func.jvp(model, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    assert torch.allclose(u, v - (t - r)[:, None] * dudt, atol=1e-9)


@pytest.mark.parametrize("objective", [ImprovedMeanFlow, MeanFlow])
def test_exact_solution_is_a_fixed_point_of_the_target(objective):
    """Fed the marginal velocity, both targets equal u* at the exact solution: the loss is 0."""
    z, r, t = _gaussian_batch()
    model = GaussianAverageVelocity()
    obj = objective(TimeSampler(), jvp="full")
    u, target = obj.prediction_and_target(model, z, r, t, marginal_velocity(z, t), None)
    assert torch.allclose(target, model(z, r, t), atol=1e-9)
    assert torch.allclose(u, target, atol=1e-9)


def test_imf_tangent_is_the_network_velocity_and_the_target_moves_with_v_alone():
    """iMF's JVP runs along the network's own velocity u(z, t, t), so its target depends on
    the data only through v: target(v1) - target(v2) = v1 - v2 exactly; MeanFlow's does not."""
    z, r, t = _gaussian_batch()
    model = GaussianAverageVelocity()
    g = torch.Generator().manual_seed(5)
    v1, v2 = (torch.randn(z.shape, generator=g, dtype=torch.float64) for _ in range(2))
    imf, mf = ImprovedMeanFlow(jvp="full"), MeanFlow(jvp="full")
    tangent = imf.tangent(model, z, r, t, v1, None)
    assert torch.allclose(tangent, marginal_velocity(z, t), atol=1e-12)
    _, dudt = torch.func.jvp(model, (z, r, t),
                             (tangent, torch.zeros_like(r), torch.ones_like(t)))
    _, a = imf.prediction_and_target(model, z, r, t, v1, None)
    _, b = imf.prediction_and_target(model, z, r, t, v2, None)
    assert torch.allclose(a, v1 - (t - r)[:, None] * dudt, atol=1e-9)
    assert torch.allclose(a - b, v1 - v2, atol=1e-9)
    _, c = mf.prediction_and_target(model, z, r, t, v1, None)
    _, d = mf.prediction_and_target(model, z, r, t, v2, None)
    assert not torch.allclose(c - d, v1 - v2, atol=1e-3)


def test_imf_subset_and_full_agree_and_the_tangent_ignores_dropout():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 3)).double()

    def model(z, r, t, y=None):
        return net(torch.cat([z, r[:, None], t[:, None]], 1))

    module = _Wrap(model, net)
    z, r, t = _gaussian_batch()
    r[::2] = t[::2]
    v = torch.randn_like(z)
    imf = ImprovedMeanFlow()
    assert torch.equal(imf.tangent(module, z, r, t, v, None), imf.tangent(module, z, r, t, v, None))
    assert net.training  # put back in train mode
    net.eval()  # the rest compares subset and full without dropout noise
    u1, t1 = ImprovedMeanFlow(jvp="full").prediction_and_target(module, z, r, t, v, None)
    u2, t2 = ImprovedMeanFlow(jvp="subset").prediction_and_target(module, z, r, t, v, None)
    assert torch.allclose(u1, u2, atol=1e-12) and torch.allclose(t1, t2, atol=1e-12)
    assert torch.allclose(t1[::2], v[::2])  # r = t rows: the velocity itself


class _Wrap(torch.nn.Module):
    def __init__(self, fn, net):
        super().__init__()
        self.fn, self.net = fn, net

    def forward(self, z, r, t, y=None):
        return self.fn(z, r, t, y)


def test_alpha_schedule_matches_the_formula():
    total = 1000
    assert alpha_schedule(0, total) == 1.0 and alpha_schedule(total, total) == 0.0
    assert alpha_schedule(500, total) == pytest.approx(0.5)
    x = 25 * (600 - 500) / 1000
    assert alpha_schedule(600, total) == pytest.approx(1 - 1 / (1 + math.exp(-x)))
    # snapped to exactly 1 and 0 near the ends (|x| > ln(199) / 25 * 1000 ~ 212 steps)
    assert alpha_schedule(280, total) == 1.0 and alpha_schedule(720, total) == 0.0
    # a window inside the run: constant before and after it
    kw = dict(begin=0.5, finish=0.75)
    assert alpha_schedule(400, total, **kw) == 1.0
    assert alpha_schedule(625, total, **kw) == pytest.approx(0.5)
    assert alpha_schedule(900, total, **kw) == 0.0


def test_alphaflow_target_by_hand_and_its_limits():
    z, r, t = _gaussian_batch()
    r[:8] = t[:8]
    model = GaussianAverageVelocity()
    v = torch.randn_like(z)
    obj = AlphaFlow()
    obj.alpha = 0.3
    s = 0.3 * r + 0.7 * t
    zs = z - (t - s)[:, None] * v
    want = 0.3 * v + 0.7 * model(zs, r, s)
    want[:8] = v[:8]
    _, target = obj.prediction_and_target(model, z, r, t, v, None)
    assert torch.allclose(target, want, atol=1e-12)
    # alpha = 1: trajectory flow matching, target v, one network call
    calls = []
    obj.alpha = 1.0
    _, target = obj.prediction_and_target(lambda *a, **k: calls.append(1) or model(*a, **k),
                                          z, r, t, v, None)
    assert torch.equal(target, v) and len(calls) == 1
    # alpha = 0: MeanFlow's target exactly; small alpha: the step towards the target, over
    # alpha, tends to MeanFlow's, (u_tgt - u) / alpha -> v - (t - r) du/dt - u, to first order
    u, mf = MeanFlow(jvp="full").prediction_and_target(model, z, r, t, v, None)
    obj.alpha = 0.0
    assert torch.allclose(obj.prediction_and_target(model, z, r, t, v, None)[1], mf, atol=1e-12)
    gaps = []
    for alpha in (1e-2, 1e-3):
        obj.alpha = alpha
        step = (obj.prediction_and_target(model, z, r, t, v, None)[1] - u) / alpha
        gaps.append(float((step - (mf - u))[8:].abs().max()))  # the r < t rows
    assert gaps[1] < gaps[0] / 5


def test_alphaflow_weights_the_r_below_t_rows_by_alpha():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()

    def net(z, r, t, y=None):
        return model(z) * t[:, None]

    x, _, _ = _gaussian_batch(seed=1)
    noise = torch.randn_like(x)
    r, t = torch.full((64,), 0.2, dtype=torch.float64), torch.full((64,), 0.8, dtype=torch.float64)
    r[:16] = t[:16]
    obj = AlphaFlow(c=1e-3, p=1.0)
    obj.alpha = 0.25
    out = obj(net, x, noise=noise, r=r, t=t)
    plain = out.err / (out.err + 1e-3)
    assert torch.allclose(out.per_sample[:16], plain[:16])
    assert torch.allclose(out.per_sample[16:], 0.25 * plain[16:])


@pytest.mark.parametrize("objective", ["imf", "alphaflow"])
def test_new_objectives_train_and_sample_through_the_trainer(tmp_path, objective):
    cfg = configure(TrainConfig(), "tiny", [("objective", objective), ("steps", 30),
                                            ("time.ratio", 0.5), ("log_every", 10)])
    result = train(cfg, str(tmp_path / objective), progress=False)
    assert math.isfinite(result.final_loss)
    run = load_run(str(tmp_path / objective))
    assert run.config.objective == objective
    assert torch.isfinite(torch.as_tensor(run.sample(16, steps=1, seed=0))).all()


# -- improved MeanFlow with the guidance scale and interval as network inputs ---------------

class ToyGuided(torch.nn.Module):
    """u = W z + t a + (1 - 1/omega) e_y + t_min b + t_max c: every input visible."""

    def __init__(self, classes=3, d=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.e = torch.nn.Parameter(torch.randn(classes + 1, d, generator=g, dtype=torch.float64))
        self.abc = torch.nn.Parameter(torch.randn(3, d, generator=g, dtype=torch.float64))

    def forward(self, z, r, t, y=None, guidance=None):
        omega, t_min, t_max = guidance.unbind(1)
        return (z @ self.w.T + t[:, None] * self.abc[0] + (1 - 1 / omega)[:, None] * self.e[y]
                + t_min[:, None] * self.abc[1] + t_max[:, None] * self.abc[2] + 0.1 * r[:, None])


def test_guidance_inputs_draws_and_guided_velocity_by_hand():
    from meanflow.flow.path import linear_path
    from meanflow.objectives.imf import GuidanceInputsIMF
    from meanflow.objectives.meanflow import Conditioned

    obj = GuidanceInputsIMF(3, TimeSampler(ratio=0.5), label_dropout=0.0)
    d = obj.draw(4000, (2,), generator=torch.Generator().manual_seed(1))
    omega, t_min, t_max = d.guide.unbind(1)
    flat = d.r == d.t
    assert bool((omega >= 1).all() and (omega <= 8).all())
    assert abs(float(torch.log(omega).mean()) - math.log(8) / 2) < 0.05  # log-uniform
    assert bool((t_min[flat] == 0).all() and (t_max[flat] == 1).all())
    assert bool((t_min[~flat] <= 0.5).all() and (t_max[~flat] >= 0.5).all())

    net = ToyGuided()
    n = 6
    x = torch.randn(n, 2, dtype=torch.float64)
    noise = torch.randn(n, 2, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6, 0.9, 0.5, 0.7, 0.2], dtype=torch.float64)
    r = t * 0.5
    y = torch.tensor([0, 1, 2, 3, 1, 0])  # row 3: the null label (dropped)
    guide = torch.tensor([[3.0, 0.2, 0.8], [2.0, 0.0, 0.5], [4.0, 0.1, 0.7],
                          [5.0, 0.0, 1.0], [1.0, 0.0, 1.0], [6.0, 0.1, 0.9]],
                         dtype=torch.float64)
    path = linear_path(x, noise, t)
    model = Conditioned(net, {"guidance": guide})
    v_tilde = obj.velocity(model, path, r, t, y)
    w = torch.tensor([3.0, 1.0, 1.0, 5.0, 1.0, 6.0], dtype=torch.float64)  # inside the interval
    unit = torch.stack([w, torch.zeros(n, dtype=w.dtype), torch.ones(n, dtype=w.dtype)], 1)
    ones = torch.stack([torch.ones(n, dtype=w.dtype), torch.zeros(n, dtype=w.dtype),
                        torch.ones(n, dtype=w.dtype)], 1)
    u_c = net(path.z, t, t, y, unit)
    u_u = net(path.z, t, t, torch.full_like(y, 3), ones)
    want = path.v + (1 - 1 / w)[:, None] * (u_c - u_u)
    want[3] = path.v[3]  # dropped label: v itself
    assert torch.allclose(v_tilde, want, atol=1e-12)
    assert torch.allclose(obj.tangent(model, path.z, r, t, path.v, y), u_c, atol=1e-12)


def test_networks_take_guidance_inputs():
    from meanflow.errors import MeanFlowError
    from meanflow.nn import MLP, dit, unet

    torch.manual_seed(0)
    r, t, y = torch.zeros(4), torch.rand(4), torch.tensor([0, 1, 2, 3])
    g = torch.tensor([[3.0, 0.2, 0.8]] * 4)
    for net, z in ((MLP(2, num_classes=3, guidance_inputs=True), torch.randn(4, 2)),
                   (unet("small", in_channels=1, input_size=8, num_classes=3,
                         guidance_inputs=True), torch.randn(4, 1, 8, 8)),
                   (dit("T/2", input_size=8, in_channels=4, num_classes=3,
                        guidance_inputs=True), torch.randn(4, 4, 8, 8))):
        for p in net.parameters():  # away from the zero inits of the U-Net / DiT outputs
            torch.nn.init.normal_(p, std=0.1)
        net.eval()  # no dropout
        unguided = torch.tensor([[1.0, 0.0, 1.0]] * 4)
        assert torch.equal(net(z, r, t, y), net(z, r, t, y, guidance=unguided))
        assert not torch.allclose(net(z, r, t, y), net(z, r, t, y, guidance=g))
    with pytest.raises(MeanFlowError, match="no guidance inputs"):
        MLP(2, num_classes=3)(torch.randn(4, 2), r, t, y, guidance=g)


def test_guidance_inputs_train_and_sample_in_one_evaluation(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    k = rng.integers(0, 4, 2048)
    x = np.stack([np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)], 1) * 2
    x = x + 0.1 * rng.standard_normal((2048, 2))
    data = tmp_path / "four.npz"
    np.savez(data, x=x.astype(np.float32), y=k.astype(np.int64))
    cfg = configure(TrainConfig(), "tiny", [("data", str(data)), ("objective", "imf"),
                                            ("guidance.inputs", True), ("steps", 30),
                                            ("time.ratio", 0.5), ("log_every", 10)])
    result = train(cfg, str(tmp_path / "run"), progress=False)
    assert math.isfinite(result.final_loss)
    run = load_run(str(tmp_path / "run"))
    calls = []
    forward = run.model.forward
    run.model.forward = lambda *a, **k: calls.append(k.get("guidance")) or forward(*a, **k)
    a = run.sample(64, steps=1, seed=0, classes="0", guidance=1.0)
    b = run.sample(64, steps=1, seed=0, classes="0", guidance=4.0)
    assert len(calls) == 2 and float(calls[1][0, 0]) == 4.0  # one evaluation per sample
    assert not np.allclose(a, b)
