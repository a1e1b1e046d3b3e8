"""meanflow.nn.forward_mode.routing: standard torch.nn layers of any network take the lean rules.

Reference: PyTorch's own forward-mode rule (``torch.func.jvp`` without the routing, in float64).
Each standard layer, with tangents on its input (forward-AD dual tensors and torch.func) and on
its parameters (torch.func), must equal it to float64 precision, and the lean rule must really
run (the profiler sees its ``autograd.Function``); a call the rules do not cover must fall back
to PyTorch's rule (equal numbers, no lean rule). A whole user-style network must give the same
``du/dt`` and the same MeanFlow loss and gradients as ``jvp_backend="func"`` under
``torch_rules()``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

from meanflow import MeanFlow, TimeSampler
from meanflow.flow.jvp import total_derivative
from meanflow.nn import MLP
from meanflow.nn.forward_mode import torch_rules
from meanflow.nn.forward_mode.routing import ROUTED, route_standard_layers, routing_needed

TOL = dict(rtol=1e-10, atol=1e-12)


class SDPA(nn.Module):
    def __init__(self, scale=None, **kwargs):
        super().__init__()
        self.scale, self.kwargs = scale, kwargs

    def forward(self, x):  # (B, H, N, D) used as q, k (scaled) and v (squared)
        return F.scaled_dot_product_attention(
            x, 0.5 * x, x * x, scale=self.scale, **self.kwargs
        )


def _routed():
    """(name, layer factory, input shape, the lean rule's autograd.Function name)."""
    return [
        ("linear", lambda: nn.Linear(6, 5), (3, 4, 6), "_Linear"),
        ("linear-nobias", lambda: nn.Linear(6, 5, bias=False), (7, 6), "_Linear"),
        ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9), "_Conv"),
        ("conv2d-stride", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9), "_Conv"),
        ("conv2d-groups", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (2, 4, 6, 6), "_Conv"),
        ("conv2d-valid", lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 2, 6, 6), "_Conv"),
        ("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=(1, 0, 1), dilation=2), (1, 2, 7, 7, 7),
         "_Conv"),
        ("groupnorm", lambda: nn.GroupNorm(2, 4), (3, 4, 5, 5), "_GroupNorm"),
        ("groupnorm-plain", lambda: nn.GroupNorm(2, 4, affine=False), (3, 4, 5), "_GroupNorm"),
        ("layernorm", lambda: nn.LayerNorm(6), (3, 4, 6), "_LayerNorm"),
        ("layernorm-2d", lambda: nn.LayerNorm((4, 6), eps=1e-3), (3, 4, 6), "_LayerNorm"),
        ("rmsnorm", lambda: nn.RMSNorm(6, eps=1e-4), (3, 4, 6), "_RMSNorm"),
        ("rmsnorm-plain", lambda: nn.RMSNorm((4, 6), elementwise_affine=False), (3, 4, 6),
         "_RMSNorm"),
        ("silu", lambda: nn.SiLU(), (3, 4, 6), "_Pointwise"),
        ("gelu", lambda: nn.GELU(), (3, 4, 6), "_Pointwise"),
        ("gelu-tanh", lambda: nn.GELU(approximate="tanh"), (3, 4, 6), "_Pointwise"),
        ("sdpa", lambda: SDPA(), (2, 3, 7, 4), "_Attention"),
        ("sdpa-scale", lambda: SDPA(scale=0.3), (2, 3, 7, 4), "_Attention"),
    ]


class Functional(nn.Module):
    """Functional calls in less common forms: a 1-D input to F.linear, a weight that depends on
    the input (carries a tangent), norms called directly."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):  # x: (6,)
        h = F.linear(x, self.w * x.sum())  # the weight carries a tangent too
        h = F.layer_norm(h, (5,)) + F.rms_norm(h, [5])
        return F.linear(h, torch.ones(5, 5, dtype=h.dtype))


def _routed_functional():
    return [("functional", Functional, (6,), "_Linear")]


def _fallbacks():
    """Calls the rules do not cover: PyTorch's rule must compute them."""
    return [
        ("conv-same", lambda: nn.Conv2d(2, 3, 3, padding="same"), (2, 2, 6, 6)),
        ("conv-unbatched", lambda: nn.Conv2d(2, 3, 3), (2, 6, 6)),
        ("silu-inplace", lambda: nn.Sequential(nn.Tanh(), nn.SiLU(inplace=True)), (3, 6)),
        ("sdpa-causal", lambda: SDPA(is_causal=True), (2, 3, 7, 4)),
        ("tanh", lambda: nn.Tanh(), (3, 6)),
        ("flatten-softplus", lambda: nn.Sequential(nn.Flatten(0), nn.Softplus()), (3, 6)),
    ]


def _make(factory, shape):
    torch.manual_seed(0)
    layer = factory().double()
    with torch.no_grad():
        for p in layer.parameters():  # away from the identity init of the norms
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(shape, dtype=torch.float64)
    return layer, x


def _reference(layer, x, dx):
    with torch_rules(), sdpa_kernel(SDPBackend.MATH):  # the only SDPA kernel with forward AD
        return torch.func.jvp(layer, (x,), (dx,))


def _forward_ad(layer, x, dx):
    with route_standard_layers(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
        out = layer(fwAD.make_dual(x, dx))
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def _events(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


ALL = _routed() + _routed_functional()


@pytest.mark.parametrize("name,factory,shape,rule", ALL, ids=[c[0] for c in ALL])
def test_routed_layer_equals_pytorch_rule_and_uses_the_lean_rule(name, factory, shape, rule):
    layer, x = _make(factory, shape)
    dx = torch.randn_like(x)
    ref_out, ref_tan = _reference(layer, x, dx)
    out, tan = _forward_ad(layer, x, dx)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(tan, ref_tan, **TOL)
    with route_standard_layers():
        f_out, f_tan = torch.func.jvp(layer, (x,), (dx,))
    torch.testing.assert_close(f_out, ref_out, **TOL)
    torch.testing.assert_close(f_tan, ref_tan, **TOL)
    assert rule in _events(lambda: _forward_ad(layer, x, dx))
    assert rule not in _events(lambda: _reference(layer, x, dx))


@pytest.mark.parametrize("name,factory,shape,rule", _routed(), ids=[c[0] for c in _routed()])
def test_routed_layer_parameter_tangents_equal_pytorch_rule(name, factory, shape, rule):
    layer, x = _make(factory, shape)
    params = dict(layer.named_parameters())
    if not params:
        pytest.skip("no parameters")
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    dx = torch.randn_like(x)

    def f(p, x_):
        return torch.func.functional_call(layer, p, (x_,))

    with torch_rules():
        _, ref = torch.func.jvp(f, (params, x), (tangents, dx))
    with route_standard_layers():
        _, got = torch.func.jvp(f, (params, x), (tangents, dx))
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("name,factory,shape", _fallbacks(), ids=[c[0] for c in _fallbacks()])
def test_uncovered_calls_fall_back_to_pytorch_rule(name, factory, shape):
    layer, x = _make(factory, shape)
    dx = torch.randn_like(x)
    ref_out, ref_tan = _reference(layer, x.clone(), dx)
    out, tan = _forward_ad(layer, x.clone(), dx)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(tan, ref_tan, **TOL)
    lean = {"_Linear", "_Conv", "_Pointwise", "_Attention", "_GroupNorm", "_LayerNorm"}
    assert not lean & _events(lambda: _forward_ad(layer, x.clone(), dx))


def test_embedding_of_tangent_free_weights_has_no_tangent():
    emb = nn.Embedding(5, 3)
    with route_standard_layers(), fwAD.dual_level():
        out = emb(torch.tensor([1, 4]))
        assert fwAD.unpack_dual(out).tangent is None


def test_no_routing_outside_a_transform_or_under_torch_rules():
    layer, x = _make(lambda: nn.Linear(6, 5), (3, 6))
    with route_standard_layers():
        assert "_Linear" not in _events(lambda: layer(x))  # no transform: torch.nn's own
    with torch_rules():
        assert "_Linear" not in _events(lambda: _forward_ad(layer, x, torch.randn_like(x)))
    assert "F.linear" in ROUTED and "F.scaled_dot_product_attention" in ROUTED


class UserNet(nn.Module):
    """A user-style network of torch.nn layers only, obeying model(z, r, t, y=None)."""

    def __init__(self, channels=8):
        super().__init__()
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(2, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.norm = nn.GroupNorm(2, channels)
        self.attn_norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.mlp = nn.Sequential(nn.RMSNorm(channels), nn.Linear(channels, channels), nn.GELU())
        self.out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, z, r, t, y=None):
        h = self.inp(z) + self.time(torch.stack([t, t - r], 1))[:, :, None, None]
        h = F.silu(self.norm(h))
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(self.attn_norm(seq)).view(b, -1, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        seq = seq + a + self.mlp(seq + a)
        return self.out(seq.transpose(1, 2).reshape(b, c, hh, ww))


def _batch(dtype=torch.float64, n=4):
    gen = torch.Generator().manual_seed(3)
    z, v = (torch.randn(n, 1, 6, 6, generator=gen, dtype=dtype) for _ in range(2))
    t = torch.rand(n, generator=gen, dtype=dtype)
    return z, t * torch.rand(n, generator=gen, dtype=dtype), t, v


@pytest.mark.parametrize("backend", ["forward-ad", "func"])
def test_user_network_total_derivative_equals_pytorch_rule(backend):
    torch.manual_seed(0)
    model = UserNet().double()
    z, r, t, v = _batch()
    with torch_rules(), sdpa_kernel(SDPBackend.MATH):
        ref_u, ref = torch.func.jvp(
            lambda a, b, c: model(a, b, c), (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
        )
    events = set()

    def run():
        return total_derivative(model, z, r, t, v, backend=backend)

    u, dudt = run()
    torch.testing.assert_close(u, ref_u, **TOL)
    torch.testing.assert_close(dudt, ref, **TOL)
    if backend == "forward-ad":
        events = _events(run)
        assert {"_Linear", "_Conv", "_GroupNorm", "_LayerNorm", "_RMSNorm", "_Attention"} <= events


def test_user_network_meanflow_loss_and_gradients_equal_the_func_reference():
    torch.manual_seed(0)
    model = UserNet()
    x = torch.randn(8, 1, 6, 6)
    results = []
    for backend, rules_off in (("func", True), ("forward-ad", False)):
        model.zero_grad(set_to_none=True)
        objective = MeanFlow(TimeSampler(ratio=0.5), jvp_backend=backend)
        draws = objective.draw(8, (1, 6, 6), generator=torch.Generator().manual_seed(5))
        if rules_off:
            with torch_rules():
                loss = objective(model, x, None, **draws.kwargs()).loss
        else:
            loss = objective(model, x, None, **draws.kwargs()).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


class Wrapper(nn.Module):
    """A user's class around a project network: routing on, so both paths meet."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z, r, t, y=None):
        return self.inner(z, r, t, y=y)


@pytest.mark.parametrize("backend", ["forward-ad", "func"])
def test_project_layers_are_not_handled_twice(backend):
    torch.manual_seed(0)
    model = Wrapper(MLP(2, hidden=16, depth=3))
    assert routing_needed(model)
    z, v = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.rand(5)
    with profile() as prof:
        _, dudt = total_derivative(model, z, t * 0.5, t, v, backend=backend)
    calls = {e.key: e.count for e in prof.key_averages()}
    # every Linear of this MLP sees the tangent of z or t, and runs its rule once
    assert calls.get("_Linear") == sum(isinstance(m, nn.Linear) for m in model.modules())
    with torch_rules():
        _, ref = total_derivative(model.inner, z, t * 0.5, t, v, backend="func")
    torch.testing.assert_close(dudt, ref, rtol=1e-5, atol=1e-6)


def test_routing_is_skipped_for_networks_of_the_project_layers_only():
    assert not routing_needed(MLP(2, hidden=8, depth=2))
    assert routing_needed(nn.Sequential(MLP(2, hidden=8, depth=2), nn.SiLU()))
    assert routing_needed(UserNet()) and routing_needed(lambda z, r, t, y=None: z)


def test_user_network_under_bf16_autocast_stays_close_to_the_float32_jvp():
    torch.manual_seed(0)
    model = UserNet()
    z, r, t, v = (a.float() for a in _batch())
    exact = total_derivative(model, z, r, t, v)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = total_derivative(model, z, r, t, v, autocast=True)[1]
    # bf16 (unit 4e-3): within a few units of the float32 JVP, and really not float32
    err = float((got - exact).norm() / exact.norm())
    assert 1e-4 < err < 5e-2
