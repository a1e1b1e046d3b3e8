"""Improved MeanFlow as its authors built it (Lyy-iiis/imeanflow, JAX ``imf.py``,
``models/imfDiT.py``, ``configs/default.py``, ``configs/train_config.yml``): the auxiliary
velocity head and its loss, the time and guidance-scale sampling, the loss normalisation and
the recipe's settings, each pinned to the authors' published values or to a hand computation of
their equations (never to our own output)."""

import math

import pytest
import torch

from meanflow import TimeSampler
from meanflow.errors import MeanFlowError
from meanflow.flow.path import linear_path
from meanflow.objectives.imf import GuidanceInputsIMF, ImprovedMeanFlow
from meanflow.objectives.meanflow import Conditioned
from meanflow.train import TrainConfig, configure, load_run, train

# the authors' values (configs/default.py, configs/train_config.yml, imf.py)
P_MEAN, P_STD = -0.4, 1.0
DATA_PROPORTION = 0.5  # fraction of rows with r = t
S_MAX = 7.0  # omega = exp(u * log1p(s_max)): log-uniform on [1, 1 + s_max]
CLASS_DROPOUT = 0.1
NORM_P, NORM_EPS = 1.0, 0.01
AUX_HEAD_DEPTH_B2 = 8  # imfDiT_B_2: depth 12, aux_head_depth 8


class TwoHeads(torch.nn.Module):
    """u = z W^T + t a + (t - r) b,  v = z A^T + t c + (t - r) d (float64): linear in z and t,
    so du/dt is exact for finite differences too."""

    def __init__(self, d=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.A = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.ab = torch.nn.Parameter(torch.randn(2, d, generator=g, dtype=torch.float64))
        self.cd = torch.nn.Parameter(torch.randn(2, d, generator=g, dtype=torch.float64))

    def forward(self, z, r, t, y=None, aux=False):
        h = (t - r)[:, None]
        u = z @ self.W.T + t[:, None] * self.ab[0] + h * self.ab[1]
        if not aux:
            return u
        return u, z @ self.A.T + t[:, None] * self.cd[0] + h * self.cd[1]


def _batch(n=16, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.where(torch.arange(n) < n // 2, t, t * torch.rand(n, generator=g, dtype=t.dtype))
    return x, noise, r, t


def _by_hand(net, x, noise, r, t, c=NORM_EPS):
    """The authors' loss: V = u + (t - r) sg(du/dt) with tangent (v_c, dr 0, dt 1), v_c the
    v-head at h = 0; loss = mean(w(||V - v_g||^2) + w(||v - v_g||^2)), w(l) = l / sg(l + eps)."""
    z = (1 - t[:, None]) * x + t[:, None] * noise
    v_g = noise - x
    u, v = net(z, r, t, aux=True)
    v_c = net(z, t, t, aux=True)[1].detach()
    dudt = (v_c @ net.W.T + net.ab[0] + net.ab[1]).detach()  # d/dz . v_c + d/dt (h = t - r)
    V = u + (t - r)[:, None] * dudt
    loss_u = (V - v_g).pow(2).sum(1)
    loss_v = (v - v_g).pow(2).sum(1)
    return (loss_u / (loss_u.detach() + c) + loss_v / (loss_v.detach() + c)).mean()


@pytest.mark.parametrize("backend", ["forward-ad", "finite-difference"])
def test_aux_head_loss_and_gradients_match_the_authors_equations(backend):
    net = TwoHeads()
    x, noise, r, t = _batch()
    obj = ImprovedMeanFlow(aux_head=True, c=NORM_EPS, p=NORM_P, jvp_backend=backend)
    out = obj(net, x, noise=noise, r=r, t=t)
    want = _by_hand(net, x, noise, r, t)
    tol = 1e-10 if backend == "forward-ad" else 1e-6
    assert abs(float(out.loss.detach()) - float(want.detach())) < tol * max(1.0, float(want.detach()))
    got = torch.autograd.grad(out.loss, list(net.parameters()))
    ref = torch.autograd.grad(want, list(net.parameters()))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=tol * 10, rtol=tol * 10)
    # the tangent is a stop-gradient: the v-head learns from its own loss alone
    assert got[1].abs().sum() > 0


def test_aux_head_differs_from_the_parameter_free_tangent():
    net = TwoHeads()
    x, noise, r, t = _batch()
    with_head = ImprovedMeanFlow(aux_head=True, c=NORM_EPS)(net, x, noise=noise, r=r, t=t)
    free = ImprovedMeanFlow(c=NORM_EPS)(net, x, noise=noise, r=r, t=t)
    z = (1 - t[:, None]) * x + t[:, None] * noise
    u_tt = net(z, t, t)  # the parameter-free v_hat: u(z, t, t)
    dudt = u_tt @ net.W.T + net.ab[0] + net.ab[1]
    target = (noise - x) - (t - r)[:, None] * dudt
    assert torch.allclose(free.target, target.detach(), atol=1e-12)
    assert not torch.allclose(with_head.target, free.target)


def test_aux_head_refuses_func_and_one_headed_networks():
    with pytest.raises(MeanFlowError, match="forward-ad or finite-difference"):
        ImprovedMeanFlow(aux_head=True, jvp_backend="func")
    x, noise, r, t = _batch()

    def one_head(z, r, t, y=None, aux=False):
        return z

    with pytest.raises(MeanFlowError, match="auxiliary velocity head"):
        ImprovedMeanFlow(aux_head=True)(one_head, x, noise=noise, r=r, t=t)


class ToyGuidedTwoHeads(torch.nn.Module):
    """Both heads see every guidance input; the heads differ."""

    def __init__(self, classes=3, d=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(2, d, d, generator=g, dtype=torch.float64))
        self.e = torch.nn.Parameter(torch.randn(2, classes + 1, d, generator=g,
                                                dtype=torch.float64))
        self.abc = torch.nn.Parameter(torch.randn(2, 4, d, generator=g, dtype=torch.float64))

    def head(self, k, z, r, t, y, guidance):
        omega, t_min, t_max = guidance.unbind(1)
        a = self.abc[k]
        return (z @ self.w[k].T + t[:, None] * a[0] + (1 - 1 / omega)[:, None] * self.e[k][y]
                + t_min[:, None] * a[1] + t_max[:, None] * a[2] + (t - r)[:, None] * a[3])

    def forward(self, z, r, t, y=None, guidance=None, aux=False):
        u = self.head(0, z, r, t, y, guidance)
        return (u, self.head(1, z, r, t, y, guidance)) if aux else u


def test_guided_target_and_tangent_come_from_the_v_head_with_the_interval_rule():
    """imf.py guidance_fn: v_g = v_t + (1 - 1/w')(v_c - v_u), w' = omega inside
    [t_min, t_max] and 1 outside, v_c = v-head(z, t, h=0 | y, w', 0, 1),
    v_u = v-head(z, t, h=0 | null, 1, 0, 1); v_c is the JVP tangent; dropped rows: v_g = v_t;
    r = t rows have the interval [0, 1] (no interval)."""
    obj = GuidanceInputsIMF(3, TimeSampler(ratio=0.5), label_dropout=0.0, aux_head=True)
    net = ToyGuidedTwoHeads()
    n = 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6, 0.9, 0.5, 0.7, 0.2], dtype=torch.float64)
    r = t * torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])  # row 3: the null label (dropped)
    guide = torch.tensor([[3.0, 0.2, 0.8], [2.0, 0.0, 0.5], [4.0, 0.1, 0.7],
                          [5.0, 0.0, 1.0], [2.5, 0.0, 1.0], [6.0, 0.1, 0.9]],
                         dtype=torch.float64)
    path = linear_path(x, noise, t)
    model = Conditioned(net, {"guidance": guide})
    v_tilde = obj.velocity(model, path, r, t, y)
    w = torch.tensor([3.0, 1.0, 1.0, 5.0, 2.5, 6.0], dtype=torch.float64)
    zeros, ones = torch.zeros(n, dtype=w.dtype), torch.ones(n, dtype=w.dtype)
    v_c = net.head(1, path.z, t, t, y, torch.stack([w, zeros, ones], 1))
    v_u = net.head(1, path.z, t, t, torch.full_like(y, 3), torch.stack([ones, zeros, ones], 1))
    want = path.v + (1 - 1 / w)[:, None] * (v_c - v_u)
    want[3] = path.v[3]
    assert torch.allclose(v_tilde, want, atol=1e-12)
    assert torch.allclose(obj.tangent(model, path.z, r, t, path.v, y), v_c, atol=1e-12)


def test_guidance_scale_and_interval_draws_follow_the_authors_distributions():
    """sample_cfg_scale (cfg_beta 1): omega = exp(u log1p(7)), so P(omega <= s) =
    log(s) / log(8) on [1, 8]; sample_cfg_interval: t_min ~ U(0, 0.5), t_max ~ U(0.5, 1),
    [0, 1] on r = t rows; sample_tr: data_proportion 0.5 of rows r = t."""
    obj = GuidanceInputsIMF(10, TimeSampler(ratio=1 - DATA_PROPORTION))
    assert obj.guidance.omega_max == pytest.approx(1 + S_MAX)
    assert obj.guidance.label_dropout == CLASS_DROPOUT
    d = obj.draw(40_000, (2,), generator=torch.Generator().manual_seed(0))
    omega, t_min, t_max = d.guide.unbind(1)
    assert float(omega.min()) >= 1 and float(omega.max()) <= 1 + S_MAX
    for s in (1.5, 2.0, 4.0, 6.0):
        cdf = math.log(s) / math.log1p(S_MAX)
        assert abs(float((omega <= s).double().mean()) - cdf) < 0.01
    flat = d.r == d.t
    assert abs(float(flat.double().mean()) - DATA_PROPORTION) < 0.01
    assert bool((t_min[flat] == 0).all() and (t_max[flat] == 1).all())
    lo, hi = t_min[~flat], t_max[~flat]
    assert float(lo.min()) >= 0 and float(lo.max()) <= 0.5
    assert float(hi.min()) >= 0.5 and float(hi.max()) <= 1
    assert abs(float(lo.mean()) - 0.25) < 0.005 and abs(float(hi.mean()) - 0.75) < 0.005
    assert abs(float(lo.var()) - 0.25 / 12) < 0.001  # U(0, 0.5) variance


def test_time_draws_follow_the_authors_logit_normal():
    """sample_tr: t, r = max, min of two sigmoid(N(P_mean, P_std)) draws."""
    ts = TimeSampler()
    assert (ts.mean, ts.std) == (P_MEAN, P_STD)
    ts = TimeSampler(ratio=1.0)
    r, t = ts(200_000, generator=torch.Generator().manual_seed(0))
    assert bool((r <= t).all())
    a = torch.sigmoid(P_MEAN + P_STD * torch.randn(2, 200_000,
                                                   generator=torch.Generator().manual_seed(1)))
    for ours, theirs in ((t, a.max(0).values), (r, a.min(0).values)):
        for q in (0.1, 0.5, 0.9):
            assert abs(float(ours.quantile(q)) - float(theirs.quantile(q))) < 0.005


def test_label_dropout_is_ten_percent_on_r_equal_t_rows():
    """cond_drop: num_drop = #(U < 0.1) rows get the null label, the first rows of the batch,
    which are the r = t rows (fm_mask: the first int(B * 0.5)). Ours: as many, chosen at
    random among the r = t rows."""
    obj = GuidanceInputsIMF(10, TimeSampler(ratio=1 - DATA_PROPORTION))
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(200):
        d = obj.draw(256, (2,), generator=g)
        assert bool((d.r[d.drop] == d.t[d.drop]).all())
        counts.append(int(d.drop.sum()))
    mean = sum(counts) / len(counts)
    assert abs(mean - 256 * CLASS_DROPOUT) < 1.0  # Binomial(256, 0.1): mean 25.6


# -- the networks' auxiliary head ------------------------------------------------------------

def _nets():
    from meanflow.nn import MLP, dit, unet

    return (
        (MLP(2, num_classes=3, aux_head=True), torch.randn(4, 2)),
        (unet("small", in_channels=1, input_size=8, num_classes=3, aux_head=True),
         torch.randn(4, 1, 8, 8)),
        (dit("T/2", input_size=8, in_channels=4, num_classes=3, aux_head=True, aux_depth=1),
         torch.randn(4, 4, 8, 8)),
    )


def test_networks_give_u_alone_or_u_and_v_from_one_trunk():
    torch.manual_seed(0)
    r, t, y = torch.zeros(4), torch.rand(4), torch.tensor([0, 1, 2, 3])
    for net, z in _nets():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1)
        net.eval()
        u, v = net(z, r, t, y, aux=True)
        assert torch.equal(net(z, r, t, y), u) and v.shape == u.shape
        assert not torch.allclose(u, v)
        heads = [m for n, m in net.named_children() if n.startswith("aux")]
        with torch.no_grad():  # the v-head's own layers move v, never u
            for m in heads:
                for p in m.parameters():
                    p.add_(1.0)
        u2, v2 = net(z, r, t, y, aux=True)
        assert torch.equal(u2, u) and not torch.allclose(v2, v)
    from meanflow.nn import MLP

    with pytest.raises(MeanFlowError, match="auxiliary velocity head"):
        MLP(2)(torch.randn(4, 2), r, t, aux=True)


def test_dit_branches_the_last_blocks_as_the_authors_b2():
    from meanflow.nn import dit

    base = dit("T/2", input_size=8, in_channels=4, num_classes=3)
    head = dit("T/2", input_size=8, in_channels=4, num_classes=3, aux_head=True, aux_depth=1)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(head) - n(base) == n(base.blocks[0]) + n(base.final)
    with pytest.raises(MeanFlowError, match="aux_depth"):
        dit("T/2", input_size=8, in_channels=4, num_classes=3, aux_head=True, aux_depth=3)


def test_aux_head_trains_samples_with_u_alone_and_reloads(tmp_path):
    cfg = configure(TrainConfig(), "tiny", [("objective", "imf"), ("model.aux_head", True),
                                            ("steps", 20), ("time.ratio", 0.5),
                                            ("log_every", 10)])
    result = train(cfg, str(tmp_path / "run"), progress=False)
    assert math.isfinite(result.final_loss)
    run = load_run(str(tmp_path / "run"))
    assert run.config.model.aux_head and run.model.aux_out is not None
    calls = []
    forward = run.model.forward
    run.model.forward = lambda *a, **k: calls.append(k.get("aux", False)) or forward(*a, **k)
    assert torch.isfinite(torch.as_tensor(run.sample(16, steps=1, seed=0))).all()
    assert calls and not any(calls)  # the v-head is not used at sampling


def test_aux_head_is_improved_meanflows_option():
    for pairs in ([("model.aux_head", True)],
                  [("objective", "imf"), ("model.aux_depth", 2), ("model.aux_head", True)]):
        with pytest.raises(MeanFlowError, match="aux_"):
            configure(TrainConfig(), "tiny", pairs).validate()


def test_the_imf_preset_is_the_authors_recipe():
    """configs/default.py and configs/train_config.yml (imfDiT_B_2): batch 1024, lr 1e-4 with
    10 warm-up epochs then constant, Adam b2 0.95, constant EMA 0.9999, 640 epochs (ImageNet's
    1,281,167 images, drop_last), data_proportion 0.5, P (-0.4, 1.0), cfg s_max 7, class
    dropout 0.1, norm_p 1, norm_eps 0.01, aux head on the last 8 of 12 blocks, fp32."""
    cfg = configure(TrainConfig(), "imagenet256-imf-b2", [])
    cfg.validate()
    epoch = 1_281_167 // 1024
    assert cfg.objective == "imf" and cfg.model.arch == "dit" and cfg.model.size == "B/2"
    assert cfg.model.aux_head and cfg.model.aux_depth == AUX_HEAD_DEPTH_B2
    assert (cfg.batch_size, cfg.optim.lr, cfg.optim.schedule) == (1024, 1e-4, "constant")
    assert cfg.optim.warmup == 10 * epoch and cfg.steps == 640 * epoch
    assert (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.95)
    assert cfg.ema_decay == 0.9999 and not cfg.ema_warmup and cfg.precision == "fp32"
    assert cfg.time.ratio == 1 - DATA_PROPORTION and cfg.time.order == "sorted"
    assert (cfg.time.mean, cfg.time.std) == (P_MEAN, P_STD)
    assert cfg.guidance.inputs and cfg.guidance.omega_max == 1 + S_MAX
    assert cfg.guidance.label_dropout == CLASS_DROPOUT and cfg.guidance.drop_rows == "r=t"
    assert (cfg.loss.p, cfg.loss.c) == (NORM_P, NORM_EPS)
    assert not cfg.hflip and cfg.data_shape == "4x32x32" and cfg.num_classes == 1000
