"""meanflow.nn.forward_mode: layers whose JVP rules skip the weights' zero tangents.

Each layer's (and activation's) tangent (torch.func.jvp and forward_ad dual tensors) is checked against float64
central differences, for input tangents and for parameter tangents; forward and backward
against the torch.nn layer it replaces; and the absent weight tangent is really skipped (two
convolutions per Conv2d JVP, not three)."""

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.profiler import profile

from meanflow.nn.forward_mode import (
    GELU,
    Conv2d,
    GroupNorm,
    LayerNorm,
    Linear,
    SiLU,
    lean_rules_active,
    tangents_without_graph,
    torch_rules,
)


def _layers():
    return [
        ("linear", lambda: Linear(6, 5), (3, 4, 6)),
        ("linear-nobias", lambda: Linear(6, 5, bias=False), (7, 6)),
        ("conv-stride", lambda: Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
        ("conv-groups", lambda: Conv2d(4, 4, 3, padding=1, groups=2), (2, 4, 6, 6)),
        ("groupnorm", lambda: GroupNorm(2, 4), (3, 4, 5, 5)),
        ("groupnorm-plain", lambda: GroupNorm(2, 4, affine=False), (3, 4, 5, 5)),
        ("layernorm", lambda: LayerNorm(6), (3, 4, 6)),
        ("layernorm-plain", lambda: LayerNorm(6, elementwise_affine=False, eps=1e-6), (3, 4, 6)),
        ("silu", lambda: SiLU(), (3, 4, 6)),
        ("gelu", lambda: GELU(), (3, 4, 6)),
        ("gelu-tanh", lambda: GELU(approximate="tanh"), (3, 4, 6)),
    ]


def _make(factory, shape):
    torch.manual_seed(0)
    layer = factory().double()
    with torch.no_grad():
        for p in layer.parameters():  # away from the identity init of the norms
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(shape, dtype=torch.float64)
    return layer, x


def _central(f, x, dx, h=1e-6):
    with torch.no_grad():
        return (f(x + h * dx) - f(x - h * dx)) / (2 * h)


@pytest.mark.parametrize("name,factory,shape", _layers(), ids=[c[0] for c in _layers()])
def test_input_tangent_matches_central_differences(name, factory, shape):
    layer, x = _make(factory, shape)
    dx = torch.randn_like(x)
    reference = _central(layer, x, dx)
    y, dy = torch.func.jvp(layer, (x,), (dx,))
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(layer(fwAD.make_dual(x, dx))).tangent
    assert torch.allclose(dy, reference, atol=1e-7, rtol=1e-6)
    assert torch.allclose(dual, dy, atol=1e-12, rtol=1e-12)
    assert torch.equal(y, layer(x))


@pytest.mark.parametrize("name,factory,shape", _layers(), ids=[c[0] for c in _layers()])
def test_parameter_tangents_match_central_differences(name, factory, shape):
    layer, x = _make(factory, shape)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    if not params:
        pytest.skip("no parameters")
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    dx = torch.randn_like(x)

    def f(p, x_):
        return torch.func.functional_call(layer, p, (x_,))

    _, dy = torch.func.jvp(f, (params, x), (tangents, dx))
    h = 1e-6
    plus = f({k: v + h * tangents[k] for k, v in params.items()}, x + h * dx)
    minus = f({k: v - h * tangents[k] for k, v in params.items()}, x - h * dx)
    assert torch.allclose(dy, (plus - minus) / (2 * h), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name,factory,shape", _layers(), ids=[c[0] for c in _layers()])
def test_forward_and_backward_equal_the_torch_layer(name, factory, shape):
    layer, x = _make(factory, shape)
    base = type(layer).__mro__[1]  # the torch.nn class it subclasses
    reference = base.__new__(base)
    reference.__dict__ = layer.__dict__  # same parameters, torch.nn's forward
    x.requires_grad_(True)
    with fwAD.dual_level():  # a forward-mode level is open: the layer uses its own Function
        out = layer(x)
    ref = base.forward(reference, x)
    g = torch.randn_like(out)
    inputs = [x, *layer.parameters()]
    ours = torch.autograd.grad(out, inputs, g)
    theirs = torch.autograd.grad(ref, inputs, g)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=1e-10) for a, b in zip(ours, theirs))
    assert set(layer.state_dict()) == set(base.state_dict(reference))


def _convolutions(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_absent_weight_tangent_costs_no_convolution():
    torch.manual_seed(0)
    ours, plain = Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
    x, dx = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    # the primal and the tangent dx * W: two convolutions, whatever torch.nn's formula does
    assert _convolutions(lambda: torch.func.jvp(ours, (x,), (dx,))) == 2
    assert _convolutions(lambda: torch.func.jvp(plain, (x,), (dx,))) >= 2


def test_activation_tangent_records_no_graph_when_told():
    """Under autograd, PyTorch's own SiLU rule expands into sigmoid and products that it
    records; ours is one kernel, and none is recorded under tangents_without_graph."""
    x = torch.randn(4, 5, requires_grad=True)
    dx = torch.randn(4, 5)
    with tangents_without_graph():
        y, dy = torch.func.jvp(SiLU(), (x,), (dx,))
    assert y.requires_grad and not dy.requires_grad
    s = torch.sigmoid(x.detach())
    assert torch.allclose(dy, dx * s * (1 + x.detach() * (1 - s)), atol=1e-6)


def test_tangent_is_differentiable_unless_told_otherwise():
    torch.manual_seed(0)
    layer = Linear(3, 2)
    x, dx = torch.randn(5, 3), torch.randn(5, 3)
    y, dy = torch.func.jvp(layer, (x,), (dx,))
    assert dy.requires_grad  # d(dy)/dW = dx: the tangent can be differentiated
    (grad,) = torch.autograd.grad(dy.sum(), layer.weight)
    assert torch.allclose(grad, dx.sum(0).expand(2, 3))
    with tangents_without_graph():
        y, dy = torch.func.jvp(layer, (x,), (dx,))
    assert y.requires_grad and not dy.requires_grad  # the primal keeps its graph


def test_autocast_casts_as_documented():
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16), fwAD.dual_level():
        assert Conv2d(4, 4, 1)(x).dtype == torch.bfloat16
        assert Linear(5, 3)(x).dtype == torch.bfloat16
        assert GroupNorm(2, 4)(x.bfloat16()).dtype == torch.float32  # norms in float32
        assert LayerNorm(5)(x.bfloat16()).dtype == torch.float32


def test_outside_forward_mode_the_layers_are_torch_nn():
    torch.manual_seed(0)
    layer, x = Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)
    assert not lean_rules_active()
    with profile() as prof:
        layer(x)
    assert not any(e.key == "_Conv" for e in prof.key_averages())
    with fwAD.dual_level():
        assert lean_rules_active()
        with profile() as prof:
            layer(x)
    assert any(e.key == "_Conv" for e in prof.key_averages())


def test_torch_rules_turns_the_lean_rules_off_inside_transforms():
    torch.manual_seed(0)
    layer, x, dx = Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    _, lean = torch.func.jvp(layer, (x,), (dx,))
    with torch_rules():
        assert not lean_rules_active()
        with profile() as prof:
            _, plain = torch.func.jvp(layer, (x,), (dx,))
    assert not any(e.key == "_Conv" for e in prof.key_averages())
    assert torch.allclose(lean, plain, atol=1e-6)
