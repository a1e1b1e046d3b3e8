import math

import pytest
import torch
from conftest import assert_jvp_modes_agree
from torch import nn

from meanflow import GuidedMeanFlow, MeanFlow, MeanFlowError, TimeSampler, linear_path
from meanflow.nn import MLP

K = 3  # classes; the null label is K


class Toy(nn.Module):
    """u(z, r, t | y) = w[y] z + b t + a r, with its own weight w[K] for the null label.

    Along the tangent (v~, 0, 1) the total derivative is w[y] v~ + b, and at r = t the network
    is w[y] z + (a + b) t. Records (batch size, labels) of every call.
    """

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.5, 0.8, 1.7], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.6, dtype=torch.float64))
        self.a = nn.Parameter(torch.tensor(-0.4, dtype=torch.float64))
        self.calls = []

    def forward(self, z, r, t, y=None):
        if y is None:
            y = torch.full((z.shape[0],), K, dtype=torch.long)
        self.calls.append((z.shape[0], y.clone()))
        return self.w[y][:, None] * z + self.b * t[:, None] + self.a * r[:, None]


def _data(b, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randn(b, d, generator=g, dtype=torch.float64))


# t in [0.2, 0.7] is guided unless the label is null (dropped); boundaries included
T = torch.tensor([0.5, 0.7, 0.2, 0.9, 0.1, 0.5, 0.6, 0.4], dtype=torch.float64)
R = torch.tensor([0.1, 0.7, 0.0, 0.3, 0.05, 0.2, 0.6, 0.0], dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 1, 0, K, K, 2])
GUIDED = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)


def _hand_target(model, x, noise, r, t, y, omega, kappa, guided):
    w, b, a = model.w.detach(), model.b.detach(), model.a.detach()
    tt, rr = t[:, None], r[:, None]
    z, v = (1 - tt) * x + tt * noise, noise - x
    u_null = w[K] * z + (a + b) * tt
    u_cond = w[y][:, None] * z + (a + b) * tt
    v_g = omega * v + (1 - omega - kappa) * u_null + kappa * u_cond
    v_g = torch.where(guided[:, None], v_g, v)
    return v_g - (tt - rr) * (w[y][:, None] * v_g + b), z


@pytest.mark.parametrize("jvp", ["full", "subset", "detached"])
@pytest.mark.parametrize("omega,kappa", [(0.6, 0.3), (2.0, 0.0)])
def test_guided_target_by_hand(jvp, omega, kappa):
    model = Toy()
    x, noise = _data(8)
    obj = GuidedMeanFlow(K, omega=omega, kappa=kappa, t_min=0.2, t_max=0.7, label_dropout=0.0,
                         jvp=jvp)
    out = obj(model, x, Y, noise=noise, r=R, t=T)
    target, z = _hand_target(model, x, noise, R, T, Y, omega, kappa, GUIDED)
    assert torch.allclose(out.target, target, rtol=1e-12, atol=1e-12)
    w = model.w.detach()
    assert torch.allclose(out.u, w[Y][:, None] * z + 0.6 * T[:, None] - 0.4 * R[:, None])
    # the guidance really changes the guided samples, and only them
    plain = MeanFlow(jvp=jvp)(model, x, Y, noise=noise, r=R, t=T).target
    assert torch.equal(out.target[~GUIDED], plain[~GUIDED])
    assert (out.target[GUIDED] - plain[GUIDED]).abs().min() > 1e-3


def test_unguided_setting_is_plain_meanflow_without_extra_calls():
    x, noise = _data(8)
    guided, plain = Toy(), Toy()
    a = GuidedMeanFlow(K, omega=1.0, kappa=0.0, label_dropout=0.0)(
        guided, x, Y, noise=noise, r=R, t=T)
    b = MeanFlow()(plain, x, Y, noise=noise, r=R, t=T)
    assert torch.equal(a.target, b.target) and torch.equal(a.loss, b.loss)
    assert len(guided.calls) == len(plain.calls)
    # with sampled noise and times and no dropout, the same generator gives the same draws
    a = GuidedMeanFlow(K, label_dropout=0.0)(guided, x, Y,
                                             generator=torch.Generator().manual_seed(3))
    b = MeanFlow()(plain, x, Y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.target, b.target) and torch.equal(a.t, b.t)
    assert len(guided.calls) == len(plain.calls)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_guidance_calls(kappa):
    """One extra call at r = t on the guided samples only; the conditional term only if kappa."""
    model = Toy()
    x, noise = _data(8)
    obj = GuidedMeanFlow(K, omega=0.5, kappa=kappa, t_min=0.2, t_max=0.7, label_dropout=0.0)
    obj(model, x, Y, noise=noise, r=R, t=T)
    assert len(model.calls) == len(_count_plain(x, noise)) + 1
    size, labels = model.calls[0]  # the velocity is computed before the prediction
    null = torch.full((int(GUIDED.sum()),), K)
    expected = null if kappa == 0 else torch.cat([null, Y[GUIDED]])
    assert size == expected.numel() and torch.equal(labels, expected)


def _count_plain(x, noise):
    model = Toy()
    MeanFlow()(model, x, Y, noise=noise, r=R, t=T)
    return model.calls


def test_no_guided_sample_means_no_extra_call():
    model = Toy()
    x, noise = _data(8)
    obj = GuidedMeanFlow(K, omega=0.5, kappa=0.5, t_min=0.95, t_max=1.0, label_dropout=0.0)
    out = obj(model, x, Y, noise=noise, r=R, t=T)
    assert len(model.calls) == len(_count_plain(x, noise))
    assert torch.equal(out.target, MeanFlow()(Toy(), x, Y, noise=noise, r=R, t=T).target)


def test_label_dropout_rate_and_reproducibility():
    n, p = 20000, 0.1
    obj = GuidedMeanFlow(K, label_dropout=p)
    y = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(0))
    dropped = obj.drop_labels(y, torch.Generator().manual_seed(1))
    is_null = dropped == K
    assert abs(int(is_null.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(dropped, obj.drop_labels(y, torch.Generator().manual_seed(1)))
    assert not torch.equal(dropped, obj.drop_labels(y, torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert torch.equal(GuidedMeanFlow(K, label_dropout=0.0).drop_labels(y, g), y)
    assert torch.equal(g.get_state(), state)  # no draw when there is no dropout
    assert bool((GuidedMeanFlow(K, label_dropout=1.0).drop_labels(y, g) == K).all())


def test_network_sees_dropped_labels_for_u_and_jvp():
    model = Toy()
    x, noise = _data(64)
    y = torch.randint(0, K, (64,), generator=torch.Generator().manual_seed(5))
    t = torch.full((64,), 0.5, dtype=torch.float64)
    obj = GuidedMeanFlow(K, label_dropout=0.5, jvp="full", drop_rows="any")
    out = obj(model, x, y, noise=noise, r=t / 2, t=t, generator=torch.Generator().manual_seed(4))
    expected = obj.drop_labels(y, torch.Generator().manual_seed(4))  # the first draw of a call
    assert 0 < int((expected == K).sum()) < 64
    assert len(model.calls) == 1 and torch.equal(model.calls[0][1], expected)  # u and du/dt
    w = model.w.detach()
    z = linear_path(x, noise, t).z
    assert torch.allclose(out.u, w[expected][:, None] * z + 0.6 * 0.5 - 0.4 * 0.25)


def test_gradient_flows_only_through_u():
    p, c = 1.0, 1e-3
    model = Toy()
    x, noise = _data(8)
    obj = GuidedMeanFlow(K, omega=0.6, kappa=0.3, t_min=0.2, t_max=0.7, label_dropout=0.0,
                         p=p, c=c)
    out = obj(model, x, Y, noise=noise, r=R, t=T)
    out.loss.backward()
    target, z = _hand_target(model, x, noise, R, T, Y, 0.6, 0.3, GUIDED)
    w = model.w.detach()
    diff = w[Y][:, None] * z + 0.6 * T[:, None] - 0.4 * R[:, None] - target
    scale = 2 / ((diff ** 2).sum(1) + c) ** p / len(Y)   # d loss / d diff, per sample
    grad_w = torch.zeros(K + 1, dtype=torch.float64).index_add(0, Y, scale * (diff * z).sum(1))
    assert torch.allclose(model.w.grad, grad_w)
    assert torch.allclose(model.b.grad, (scale * (diff * T[:, None]).sum(1)).sum())
    assert torch.allclose(model.a.grad, (scale * (diff * R[:, None]).sum(1)).sum())
    # the guided velocity itself carries no graph (its network terms are stop-gradients)
    v = obj.velocity(model, linear_path(x, noise, T), R, T, Y)
    assert not v.requires_grad


def test_jvp_modes_agree_with_guidance_on_an_mlp():
    torch.manual_seed(0)
    model = MLP(3, hidden=32, depth=2, num_classes=K).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, K + 1, (32,), generator=g)
    t = torch.rand(32, generator=g, dtype=torch.float64)
    r = torch.where(torch.rand(32, generator=g) < 0.5, t * 0.3, t)
    assert_jvp_modes_agree(
        lambda jvp: GuidedMeanFlow(K, omega=0.2, kappa=0.92, t_max=0.75, jvp=jvp), model, x, y,
        noise=noise, r=r, t=t, generator_seed=7)


def test_effective_scale_of_paper_settings():
    assert GuidedMeanFlow(1000, omega=1.0, kappa=0.5).effective_scale == pytest.approx(2.0)
    assert GuidedMeanFlow(1000, omega=0.2, kappa=0.92, t_max=0.75).effective_scale \
        == pytest.approx(2.5)
    assert GuidedMeanFlow(10, omega=3.0).effective_scale == 3.0


@pytest.mark.parametrize("kwargs", [
    dict(num_classes=0), dict(label_dropout=-0.1), dict(label_dropout=1.5), dict(t_min=-0.1),
    dict(t_max=1.1), dict(t_min=0.6, t_max=0.4), dict(kappa=1.0), dict(omega=0.0),
    dict(omega=-1.0), dict(omega=float("nan")),
])
def test_rejects_bad_arguments(kwargs):
    kwargs = {"num_classes": K, **kwargs}
    with pytest.raises(MeanFlowError) as info:
        GuidedMeanFlow(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("y", [None, Y.float(), Y[:5], Y.reshape(2, 4),
                               torch.where(Y == 0, K + 1, Y), torch.where(Y == 0, -1, Y)])
def test_rejects_bad_labels(y):
    x, noise = _data(8)
    with pytest.raises(MeanFlowError) as info:
        GuidedMeanFlow(K)(Toy(), x, y, noise=noise, r=R, t=T)
    assert "\n" not in str(info.value)


def test_sampling_guidance_by_hand_in_one_batched_call():
    from meanflow import sample, sampling_guidance

    model = Toy()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 2, generator=g, dtype=torch.float64)
    r = torch.rand(5, generator=g, dtype=torch.float64) * 0.5
    t = r + 0.4
    y = torch.tensor([0, 1, 2, 0, 1])
    guided = sampling_guidance(model, 2.5, K)
    with torch.no_grad():
        u = guided(z, r, t, y=y)
        assert [c[0] for c in model.calls] == [10]  # conditional and null together
        u_cond = model(z, r, t, y=y)
        u_null = model(z, r, t, y=torch.full_like(y, K))
    assert torch.allclose(u, u_null + 2.5 * (u_cond - u_null), atol=1e-12)
    # one step is e - u_w(e, 0, 1 | y)
    e = torch.randn(5, 2, generator=g, dtype=torch.float64)
    x = sample(guided, e, steps=1, y=y)
    one, zero = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        c, n = model(e, zero, one, y=y), model(e, zero, one, y=torch.full_like(y, K))
    assert torch.allclose(x, e - (n + 2.5 * (c - n)), atol=1e-12)
    assert sampling_guidance(model, 1.0, K) is model  # scale 1: the model as trained
    with pytest.raises(MeanFlowError, match=">= 0"):
        sampling_guidance(model, -1.0, K)
    with pytest.raises(MeanFlowError, match="class labels"):
        guided(z, r, t)


def test_null_labels_fall_on_r_equal_t_rows_as_the_authors():
    """The authors drop Binomial(B, p) labels on the first rows of the batch, which are its
    r = t rows (meanflow.py, cond_drop and sample_tr): every null row is an r = t row, the
    share of null rows stays p and the share of r != t rows stays ``ratio``."""
    n, p, ratio = 40_000, 0.1, 0.25
    obj = GuidedMeanFlow(K, TimeSampler(ratio=ratio), label_dropout=p)
    d = obj.draw(n, (2,), generator=torch.Generator().manual_seed(0))
    equal = d.r == d.t
    assert bool(equal[d.drop].all())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int(d.drop.sum()) - n * p) < 5 * sd
    assert abs(float((~equal).float().mean()) - ratio) < 5 * math.sqrt(ratio * (1 - ratio) / n)
    # which r = t rows are dropped varies from batch to batch
    draws = [obj.draw(64, (2,), generator=torch.Generator().manual_seed(s)) for s in range(50)]
    assert len({tuple(x.drop.nonzero().flatten().tolist()) for x in draws}) > 40
    # "any": independent of the times
    anyrow = GuidedMeanFlow(K, TimeSampler(ratio=ratio), label_dropout=p, drop_rows="any")
    d = anyrow.draw(n, (2,), generator=torch.Generator().manual_seed(0))
    share = float(((d.r < d.t) & d.drop).float().sum() / d.drop.sum())
    assert abs(share - ratio) < 0.03


def test_guidance_terms_run_without_dropout():
    """The authors evaluate u(z, t, t | null) and u(z, t, t | y) with train=False: with a
    dropout network the guided velocity is deterministic and equals the eval-mode one."""
    from torch import nn

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.emb = nn.Embedding(K + 1, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, z, r, t, y=None):
            h = torch.cat([z, (t - r)[:, None]], 1).float()
            return self.drop(self.lin(h) + self.emb(y))

    torch.manual_seed(0)
    net = Drop().train()
    obj = GuidedMeanFlow(K, omega=1.5, kappa=0.3, label_dropout=0.0)
    x = torch.randn(32, 2)
    y = torch.randint(0, K, (32,))
    t = torch.rand(32)
    path = linear_path(x, torch.randn(32, 2), t)
    a = obj.velocity(net, path, t, t, y)
    b = obj.velocity(net, path, t, t, y)
    assert torch.equal(a, b) and net.training  # deterministic, and train mode restored
    net.eval()
    assert torch.allclose(obj.velocity(net, path, t, t, y), a)
