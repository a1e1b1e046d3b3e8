import pytest
import torch
import torch.nn.functional as F
from conftest import assert_jvp_modes_agree
from torch import nn

from meanflow import FlowMatching, MeanFlow, MeanFlowError, TimeSampler, linear_path
from meanflow.flow.jvp import total_derivative
from meanflow.nn import MLP


def _mlp(dim=3, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return MLP(dim, hidden=32, depth=3, **kw).to(dtype)


def _inputs(b=16, d=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=dtype)
    v = torch.randn(b, d, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.8 + 0.15
    r = t * torch.rand(b, generator=g, dtype=dtype)
    return z, r, t, v


@pytest.mark.parametrize("time_input", ["t,t-r", "t,r", "t,r,t-r", "t-r"])
def test_jvp_matches_central_finite_difference(time_input):
    model = _mlp(time_input=time_input)
    z, r, t, v = _inputs()
    u, dudt = total_derivative(model, z, r, t, v)
    h = 1e-5
    fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-7, rtol=1e-6)
    assert torch.allclose(u, model(z, r, t))
    # a wrong tangent (r moving too) gives a different derivative: the test can fail
    wrong = (model(z + h * v, r + h, t + h) - model(z - h * v, r - h, t - h)) / (2 * h)
    assert not torch.allclose(dudt, wrong, atol=1e-4)


def test_target_of_exact_average_velocity_equals_output(gaussian_flow):
    """MeanFlow identity: with the marginal velocity as tangent, v - (t - r) du/dt = u."""

    class MarginalTangent(MeanFlow):
        def velocity(self, model, path, r, t, y):
            return model.velocity(path.z, t)

    b = 64
    g = torch.Generator().manual_seed(1)
    x = 1.5 + 0.7 * torch.randn(b, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(b, 3, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(b, generator=g, dtype=torch.float64) * 0.95
    for jvp in ("full", "subset", "detached"):
        out = MarginalTangent(jvp=jvp)(gaussian_flow, x, noise=noise, r=r, t=t)
        assert torch.allclose(out.target, out.u, atol=1e-10)
        assert out.err.max() < 1e-18
    # with the conditional velocity the per-sample target differs (only its mean matches)
    out = MeanFlow(jvp="full")(gaussian_flow, x, noise=noise, r=r, t=t)
    assert out.err.mean() > 1e-3


def test_exact_average_velocity_tends_to_marginal_velocity(gaussian_flow):
    z, _, t, _ = _inputs(d=3)
    u = gaussian_flow(z, t - 1e-7, t)
    assert torch.allclose(u, gaussian_flow.velocity(z, t), atol=1e-5)


def test_r_equal_t_gives_flow_matching_target():
    model = _mlp()
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    mf = MeanFlow(jvp="full")(model, x, noise=noise, r=t, t=t)
    fm = FlowMatching()(model, x, noise=noise, r=t, t=t)
    assert torch.allclose(mf.target, noise - x)
    assert torch.allclose(fm.target, noise - x)
    assert torch.allclose(mf.loss, fm.loss)
    assert torch.allclose(mf.u, model(linear_path(x, noise, t).z, t, t))


def test_jvp_modes_agree_in_loss_and_gradients():
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    x, noise = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    r, t = TimeSampler(ratio=0.5)(32, generator=g)
    r, t = r.double(), t.double()
    assert 0 < int((r < t).sum()) < 32
    assert_jvp_modes_agree(MeanFlow, model, x, noise=noise, r=r, t=t)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, z, r, t, y=None):
        return self.w * z


def test_adaptive_weight_and_reduction_by_hand():
    """loss = mean_b err_b / sg((err_b + c)^p), err_b summed over all non-batch dims; the
    gradient flows through err only (the weight is a stop-gradient)."""
    p, c = 0.75, 0.01
    model = Scale()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.9], dtype=torch.float64)
    out = MeanFlow(p=p, c=c)(model, x, noise=noise, r=t, t=t)
    z, v = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * noise, noise - x
    diff = 0.3 * z - v
    err = (diff ** 2).sum(dim=(1, 2, 3))
    weight = (err + c) ** p
    assert torch.allclose(out.err, err)
    assert torch.allclose(out.per_sample, err / weight)
    assert torch.allclose(out.loss, (err / weight).mean())
    out.loss.backward()
    grad = (2 * (diff * z).sum(dim=(1, 2, 3)) / weight).mean()
    assert torch.allclose(model.w.grad, grad)


def test_meanflow_target_by_hand_for_linear_model():
    """For u = w z, du/dt along (v, 0, 1) is w v, so u_tgt = v - (t - r) w v."""
    model = Scale()
    g = torch.Generator().manual_seed(5)
    x, noise = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.full((6,), 0.8, dtype=torch.float64)
    r = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 0.8], dtype=torch.float64)
    out = MeanFlow()(model, x, noise=noise, r=r, t=t)
    v = noise - x
    assert torch.allclose(out.target, v - (t - r)[:, None] * 0.3 * v)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(4, 12)
        self.time = nn.Linear(2, 4)

    def forward(self, z, r, t, y=None):
        h = z.reshape(z.shape[0], 2, 4) + self.time(torch.stack([t, t - r], 1))[:, None]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v).reshape(z.shape[0], 8)


def test_jvp_through_scaled_dot_product_attention():
    model = Attention().double()
    z, r, t, v = _inputs(b=4, d=8)
    _, dudt = total_derivative(model, z, r, t, v)
    h = 1e-5
    fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-7)


def test_jvp_runs_in_float32_under_autocast():
    model = _mlp(dtype=torch.float32)
    z, r, t, v = (a.float() for a in _inputs())
    ref_u, ref = total_derivative(model, z, r, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(z, r, t).dtype == torch.bfloat16  # autocast is really active
        u, dudt = total_derivative(model, z, r, t, v)
    assert u.dtype == dudt.dtype == torch.float32
    assert torch.allclose(dudt, ref, atol=1e-6)


def test_objective_samples_noise_and_times_reproducibly():
    model = _mlp(dtype=torch.float32)
    x = torch.randn(16, 3)
    a = MeanFlow()(model, x, generator=torch.Generator().manual_seed(7))
    b = MeanFlow()(model, x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.r, b.r)
    assert a.per_sample.shape == (16,) and a.loss.dim() == 0


@pytest.mark.parametrize("case", ["r_only", "r_gt_t", "t_gt_1", "r_neg", "shape", "noise", "empty"])
def test_objective_rejects_bad_input(case):
    model = _mlp(dtype=torch.float32)
    x, t = torch.randn(4, 3), torch.full((4,), 0.5)
    kwargs = {"r_only": dict(r=t), "r_gt_t": dict(r=t + 0.1, t=t), "t_gt_1": dict(r=t, t=t + 0.6),
              "r_neg": dict(r=t - 0.6, t=t), "shape": dict(r=t[:3], t=t[:3]),
              "noise": dict(noise=torch.randn(4, 2)), "empty": {}}[case]
    if case == "empty":
        x = torch.randn(0, 3)
    with pytest.raises(MeanFlowError):
        MeanFlow()(model, x, **kwargs)


def test_flow_matching_refuses_distinct_times_and_never_samples_them():
    model = _mlp(dtype=torch.float32)
    x = torch.randn(64, 3)
    with pytest.raises(MeanFlowError):
        FlowMatching()(model, x, r=torch.zeros(64), t=torch.full((64,), 0.5))
    out = FlowMatching(TimeSampler(ratio=0.9))(model, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.r, out.t)


@pytest.mark.parametrize("kwargs", [dict(p=-1.0), dict(c=0.0), dict(jvp="half")])
def test_objective_rejects_bad_settings(kwargs):
    with pytest.raises(MeanFlowError):
        MeanFlow(**kwargs)


def test_flow_matching_draws_one_logit_normal_time():
    from conftest import logit

    class Zero(nn.Module):
        def forward(self, z, r, t, y=None):
            return torch.zeros_like(z)

    out = FlowMatching(TimeSampler(mean=-0.4, std=1.0))(
        Zero(), torch.randn(100_000, 1), generator=torch.Generator().manual_seed(0))
    lt = logit(out.t.double())
    assert abs(lt.mean().item() + 0.4) < 0.02 and abs(lt.std().item() - 1.0) < 0.02


def test_per_row_cond_inputs_follow_their_rows():
    """``cond`` (e.g. EDM augmentation labels) reaches the network row by row, also when the
    subset JVP splits the batch: the loss equals the full-batch JVP's and a closed form."""
    from torch import nn

    class WithAug(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))

        def forward(self, z, r, t, y=None, aug=None):
            return z * self.w + aug * (t - r)[:, None] + t[:, None]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(16, 2, generator=g, dtype=torch.float64)
    aug = torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64)
    r = torch.where(torch.arange(16) % 3 == 0, t, t * 0.3)
    model = WithAug()
    outs = [MeanFlow(jvp=mode)(model, x, noise=noise, r=r, t=t, cond={"aug": aug})
            for mode in ("subset", "full", "detached")]
    for out in outs[1:]:
        assert torch.allclose(out.per_sample, outs[0].per_sample, atol=1e-12)
    # closed form: u = w z + aug (t - r) + t, du/dt = w v + aug + 1
    z = (1 - t[:, None]) * x + t[:, None] * noise
    v = noise - x
    w = model.w.detach()
    u = z * w + aug * (t - r)[:, None] + t[:, None]
    target = v - (t - r)[:, None] * (w * v + aug + 1)
    assert torch.allclose(outs[0].u, u) and torch.allclose(outs[0].target, target)


def test_a_training_step_syncs_with_the_host_once_per_data_dependent_split():
    """Reading a value of a tensor (``bool()``, ``int()``, ``.item()``: aten's
    ``_local_scalar_dense``) stalls a GPU. With its checks off (as the trainer runs it), the
    objective reads one value, the number of r != t rows, and a guided one a second, the
    number of rows guided."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from meanflow import GuidedMeanFlow
    from meanflow.nn import MLP

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    for objective, model, expected in (
            (MeanFlow(TimeSampler(ratio=0.5)), MLP(2, hidden=16, depth=2), 1),
            (GuidedMeanFlow(3, TimeSampler(ratio=0.5), omega=1.5),
             MLP(2, hidden=16, depth=2, num_classes=3), 2)):
        objective.check_inputs = False
        draws = objective.draw(64, (2,), generator=torch.Generator().manual_seed(1))
        with Count() as count:
            objective(model, x, y if expected == 2 else None, **draws.kwargs()).loss.backward()
        assert count.reads == expected
