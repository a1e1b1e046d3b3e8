"""The objective registry and guidance as a part of an objective.

- Each configuration name builds its objective (guided with classes), an unknown name is one
  clear error, and a new registry entry is a usable objective name.
- A guided objective's loss equals the value worked out by hand for a linear network, from the
  formulas of the MeanFlow paper (arXiv 2505.13447, Eq. 9-10 and Sec. 4.2-4.3: guided velocity
  ``v~ = omega v + (1 - omega - kappa) u(z, t, t | null) + kappa u(z, t, t | y)``, target
  ``v~ - (t - r) du/dt``, adaptive weight ``1 / (err + c)^p``), of iMF (arXiv 2512.02012:
  tangent ``u(z, t, t | y)``) and of AlphaFlow (arXiv 2510.20771: target
  ``alpha v~ + (1 - alpha) u(z_s, r, s)``, weight ``alpha`` on r < t rows).
"""

import inspect

import pytest
import torch
from torch import nn

import meanflow.objectives as objectives
from meanflow import MeanFlowError
from meanflow.config import schema
from meanflow.config.build import build_objective
from meanflow.config.presets import configure
from meanflow.config.schema import TrainConfig
from meanflow.objectives import (
    OBJECTIVES,
    AlphaFlow,
    Entry,
    FlowMatching,
    Guidance,
    GuidanceInputs,
    GuidanceInputsIMF,
    GuidedAlphaFlow,
    GuidedFlowMatching,
    GuidedImprovedMeanFlow,
    GuidedMeanFlow,
    ImprovedMeanFlow,
    MeanFlow,
    objective_entry,
)

K = 3  # classes; the null label is K


# -- the registry --------------------------------------------------------------------------
BUILT = {  # name: (class without labels, class with labels)
    "meanflow": (MeanFlow, GuidedMeanFlow),
    "flow-matching": (FlowMatching, GuidedFlowMatching),
    "imf": (ImprovedMeanFlow, GuidedImprovedMeanFlow),
    "alphaflow": (AlphaFlow, GuidedAlphaFlow),
}


def test_the_registry_names_are_the_configuration_names():
    assert list(OBJECTIVES) == list(BUILT)
    assert list(schema.OBJECTIVES) == list(BUILT)


@pytest.mark.parametrize("name", list(BUILT))
def test_each_name_builds_its_objective_with_and_without_guidance(name):
    plain_cls, guided_cls = BUILT[name]
    settings = [("objective", name), ("guidance.omega", 0.8), ("guidance.kappa", 0.5),
                ("guidance.t_max", 0.75), ("guidance.label_dropout", 0.2), ("loss.p", 0.5)]
    cfg = configure(TrainConfig(), None, settings)
    plain = build_objective(cfg, 0)
    assert type(plain) is plain_cls and plain.guidance is None and plain.p == 0.5
    guided = build_objective(cfg, K)
    assert type(guided) is guided_cls and isinstance(guided, plain_cls)
    g = guided.guidance
    assert type(g) is Guidance and g.num_classes == K
    assert (g.omega, g.kappa, g.t_min, g.t_max, g.label_dropout) == (0.8, 0.5, 0.0, 0.75, 0.2)
    assert guided.effective_scale == pytest.approx(0.8 / 0.5)  # read through, as before


def test_objective_options_reach_the_objective():
    cfg = configure(TrainConfig(), None, [("objective", "alphaflow"), ("alpha.gamma", 10.0),
                                          ("alpha.start", 0.8), ("loss.jvp", "full")])
    alpha = build_objective(cfg, 0)
    assert alpha.schedule["gamma"] == 10.0 and alpha.alpha == 0.8 and alpha.jvp == "full"
    # flow matching runs no JVP: the JVP options are not passed to it
    fm = build_objective(configure(cfg, None, [("objective", "flow-matching")]), K)
    assert fm.jvp == "subset"
    inputs = configure(TrainConfig(), None, [("objective", "imf"), ("guidance.inputs", True),
                                             ("guidance.omega_max", 5.0)])
    imf = build_objective(inputs, K)
    assert type(imf) is GuidanceInputsIMF and type(imf.guidance) is GuidanceInputs
    assert imf.guidance.omega_max == 5.0


def test_an_unknown_name_is_one_clear_error():
    with pytest.raises(MeanFlowError) as info:
        objective_entry("shortcut")
    message = str(info.value)
    assert "\n" not in message and "'shortcut'" in message
    assert all(name in message for name in BUILT)
    cfg = TrainConfig()
    cfg.objective = "shortcut"  # past the configuration's own check
    with pytest.raises(MeanFlowError, match="available: meanflow, flow-matching, imf, alphaflow"):
        build_objective(cfg, 0)


class HalfTarget(MeanFlow):
    """A new objective through one hook: the velocity halved."""

    def velocity(self, model, path, r, t, y):
        return 0.5 * super().velocity(model, path, r, t, y)


def test_one_registry_line_adds_an_objective(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "half", Entry(HalfTarget))
    cfg = configure(TrainConfig(), None, [("objective", "half"), ("guidance.omega", 2.0)])
    cfg.validate()
    plain, guided = build_objective(cfg, 0), build_objective(cfg, K)
    assert type(plain) is HalfTarget and plain.guidance is None
    assert type(guided) is HalfTarget and guided.guidance.omega == 2.0
    x, noise = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.full((4,), 0.5)
    out = plain(lambda z, r, t, y=None: 0 * z, x, noise=noise, r=t, t=t)
    assert torch.allclose(out.target, 0.5 * (noise - x))


def test_single_inheritance_only():
    for name in dir(objectives):
        cls = getattr(objectives, name)
        if inspect.isclass(cls) and issubclass(cls, (MeanFlow, Guidance)):
            assert len(cls.__bases__) == 1, cls


# -- a guided objective's loss by hand --------------------------------------------------------
class Linear(nn.Module):
    """u(z, r, t | y) = A[y] z + b t + a r: along (w, 0, 1) du/dt = A[y] w + b, and at r = t
    u = A[y] z + (a + b) t."""

    def __init__(self, d=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(0.5 * torch.randn(K + 1, d, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, z, r, t, y=None):
        return torch.einsum("bij,bj->bi", self.A[y], z) + t[:, None] * self.b + r[:, None] * self.a


OMEGA, KAPPA, T_MIN, T_MAX, P, C = 0.7, 0.4, 0.2, 0.8, 0.75, 1e-2
T = torch.tensor([0.5, 0.8, 0.2, 0.9, 0.1, 0.5, 0.6, 0.4], dtype=torch.float64)
R = torch.tensor([0.1, 0.8, 0.0, 0.3, 0.05, 0.5, 0.2, 0.0], dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 1, 0, 2, 1, 2])
DROP = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)


def _by_hand(kind, net, x, noise, r, t, alpha=0.5):
    """The loss of ``kind`` worked out from the papers' formulas, with plain tensor algebra."""
    A, b, a = net.A.detach(), net.b.detach(), net.a.detach()
    y = torch.where(DROP, K, Y)  # dropped labels: the null label
    tt, rr = t[:, None], r[:, None]
    z, v = (1 - tt) * x + tt * noise, noise - x

    def u(zz, r_, t_, labels):  # the network, written out
        return (A[labels] @ zz[:, :, None])[:, :, 0] + t_[:, None] * b + r_[:, None] * a

    guided = (t >= T_MIN) & (t <= T_MAX) & (y != K)
    v_g = OMEGA * v + (1 - OMEGA - KAPPA) * u(z, t, t, torch.full_like(y, K)) + KAPPA * u(z, t, t, y)
    v_g = torch.where(guided[:, None], v_g, v)
    scale = torch.ones_like(t)
    if kind == "meanflow":
        target = v_g - (tt - rr) * ((A[y] @ v_g[:, :, None])[:, :, 0] + b)
    elif kind == "imf":
        v_hat = u(z, t, t, y)  # the network's own velocity is the tangent
        target = v_g - (tt - rr) * ((A[y] @ v_hat[:, :, None])[:, :, 0] + b)
    elif kind == "flow-matching":
        target = v_g  # r = t
    else:  # alphaflow
        s = alpha * r + (1 - alpha) * t
        z_s = z - (t - s)[:, None] * v_g
        target = torch.where((r < t)[:, None], alpha * v_g + (1 - alpha) * u(z_s, r, s, y), v_g)
        scale = torch.where(r < t, alpha, 1.0)
    err = ((u(z, r, t, y) - target) ** 2).sum(1)
    return (scale * err / (err + C) ** P).mean()


@pytest.mark.parametrize("kind,cls", [("meanflow", MeanFlow), ("imf", ImprovedMeanFlow),
                                      ("flow-matching", FlowMatching), ("alphaflow", AlphaFlow)])
def test_guided_loss_equals_the_hand_computation(kind, cls):
    guidance = Guidance(K, omega=OMEGA, kappa=KAPPA, t_min=T_MIN, t_max=T_MAX)
    objective = cls(guidance=guidance, p=P, c=C)
    if kind == "alphaflow":
        objective.alpha = 0.5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 2, generator=g, dtype=torch.float64)
    r = T if kind == "flow-matching" else R
    net = Linear()
    out = objective(net, x, Y, noise=noise, r=r, t=T, drop=DROP)
    want = _by_hand(kind, net, x, noise, r, T)
    assert torch.allclose(out.loss, want, rtol=1e-12, atol=0)
    # guidance changes the loss (it is not silently off)
    plain = cls(p=P, c=C)
    if kind == "alphaflow":
        plain.alpha = 0.5
    loss = plain(net, x, torch.where(DROP, K, Y), noise=noise, r=r, t=T).loss.detach()
    assert abs(float(loss - want)) > 1e-3


@pytest.mark.parametrize("named,cls,extra", [
    (GuidedMeanFlow, MeanFlow, {}), (GuidedFlowMatching, FlowMatching, {}),
    (GuidedImprovedMeanFlow, ImprovedMeanFlow, {}), (GuidedAlphaFlow, AlphaFlow, {"gamma": 5.0}),
])
def test_the_earlier_names_are_the_composed_objectives(named, cls, extra):
    """``GuidedX(num_classes, sampler, **kw)`` draws and computes exactly what
    ``X(sampler, guidance=Guidance(num_classes, ...))`` does."""
    from meanflow.flow.times import TimeSampler
    from meanflow.nn import MLP

    kw = dict(omega=1.5, kappa=0.3, t_max=0.9, label_dropout=0.25)
    a = named(K, TimeSampler(ratio=0.5), **kw, p=0.5, **extra)
    b = cls(TimeSampler(ratio=0.5), guidance=Guidance(K, **kw), p=0.5, **extra)
    assert a.guidance.arguments() == b.guidance.arguments() and a.omega == 1.5
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=2, num_classes=K)
    x, y = torch.randn(32, 2), torch.randint(0, K, (32,))
    la = a(net, x, y, generator=torch.Generator().manual_seed(3)).loss
    lb = b(net, x, y, generator=torch.Generator().manual_seed(3)).loss
    assert torch.equal(la, lb)
    with pytest.raises(AttributeError):
        a.no_such_setting  # noqa: B018
    a.omega, a.p = 2.5, 0.25  # a guidance setting goes to the guidance, others stay
    assert a.guidance.omega == 2.5 and a.p == 0.25 and "omega" not in vars(a)
