"""The networks' one-pass forward with tangents (nn/tangent_pass.py: DiT, U-Net, MLP), the fused
adaLN ops with lean forward-mode rules (nn/forward_mode/fused.py) and the objective's use of the
pass."""

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from meanflow import MeanFlow, TimeSampler
from meanflow.flow.jvp import rows_derivative, rows_pass_available, total_derivative
from meanflow.nn import MLP, dit, unet
from meanflow.nn.forward_mode import torch_rules
from meanflow.nn.forward_mode.fused import gated_add, modulate, sinusoid

VARIANTS = {
    "dit-labels": dict(num_classes=5),
    "dit-unconditional": dict(num_classes=0),
    "dit-aux-head": dict(num_classes=5, aux_head=True, aux_depth=1),
    "dit-guidance-inputs": dict(num_classes=5, guidance_inputs=True),
    "unet-labels": dict(num_classes=5),
    "unet-two-heads": dict(num_classes=0, heads=2),
    "unet-guidance-inputs": dict(num_classes=5, guidance_inputs=True, aux_head=True),
    "mlp-labels": dict(num_classes=5),
    "mlp-t-r-fourier": dict(time_input="t,r", z_features=3),
    "mlp-guidance-inputs": dict(num_classes=5, guidance_inputs=True, aux_head=True),
}


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = VARIANTS[variant]
    if variant.startswith("dit"):
        model = dit("T/2", input_size=8, in_channels=3, **kwargs)
    elif variant.startswith("mlp"):
        model = MLP(3 * 8 * 8, hidden=32, depth=3, **kwargs)
    else:
        model = unet("tiny", 3, 8, **kwargs).eval()  # dropout: its own test below
    for p in model.parameters():  # zero-initialised layers: make every term count
        torch.nn.init.normal_(p, std=0.3)
    return model.double()


def _inputs(n=6):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return z, r, t, v, torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("time_tangent", [(0.0, 1.0), (0.3, -0.7)])
def test_rows_pass_equals_func_jvp_and_the_plain_forward(variant, time_tangent):
    model = _model(variant)
    z, r, t, v, y = _inputs()
    if isinstance(model, MLP):
        z, v = z.flatten(1), v.flatten(1)
    y = y if model.num_classes else None
    dr, dt = time_tangent
    u_ref, d_ref = torch.func.jvp(
        lambda z_, r_, t_: model(z_, r_, t_, y=y),
        (z, r, t),
        (v, torch.full_like(r, dr), torch.full_like(t, dt)),
    )
    rows = torch.tensor([4, 1, 2])
    u, du = rows_derivative(model, z, r, t, v[rows], y, rows, time_tangent)
    assert du.shape == (3, *z.shape[1:]) and not du.requires_grad and u.requires_grad
    assert torch.allclose(du, d_ref[rows], rtol=1e-10, atol=1e-10 * d_ref.abs().max().item())
    assert torch.equal(u, model(z, r, t, y=y))  # the plain forward, bit for bit
    # the graph is the plain forward's: the same gradients
    grad_out = torch.randn_like(u)
    grads = torch.autograd.grad((u * grad_out).sum(), list(model.parameters()), allow_unused=True)
    plain = torch.autograd.grad(
        (model(z, r, t, y=y) * grad_out).sum(), list(model.parameters()), allow_unused=True
    )
    for a, b in zip(grads, plain):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_total_derivative_without_graph_uses_the_pass_and_is_exact(monkeypatch):
    model = _model("dit-labels")
    z, r, t, v, y = _inputs()
    _, ref = total_derivative(model, z, r, t, v, y, backend="func")
    calls = []
    original = type(model).tangent_forward
    monkeypatch.setattr(
        type(model), "tangent_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        u, dudt = total_derivative(model, z, r, t, v, y)
    assert calls and torch.allclose(dudt, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
    # with graph the dual-tensor path runs (the primal must keep its graph)
    calls.clear()
    total_derivative(model, z, r, t, v, y)
    assert not calls


def test_the_pass_applies_only_where_its_numbers_are_the_forward_ad_ones():
    model = _model("dit-labels").float()
    z = torch.randn(2, 3, 8, 8)
    assert rows_pass_available(model, z)
    assert not rows_pass_available(model, z, backend="func")
    assert not rows_pass_available(model, z.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rows_pass_available(model, z)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's wrapper looks like
    wrapped.tangent_forward = model.tangent_forward
    assert not rows_pass_available(wrapped, z)
    assert not rows_pass_available(torch.nn.Linear(2, 2), z)
    handle = model.blocks[0].attn.register_forward_hook(lambda *a: None)
    assert not rows_pass_available(model, z)  # hooks see module calls: the dual-tensor path
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert not rows_pass_available(model, z)
    handle.remove()
    assert rows_pass_available(model, z)
    with torch_rules():
        assert not rows_pass_available(model, z)  # the comparisons' switch turns it off


@pytest.mark.parametrize("variant", ["dit-labels", "unet-labels", "mlp-labels"])
def test_objective_subset_step_takes_one_pass_and_equals_the_func_reference(variant, monkeypatch):
    model = _model(variant)
    z, r, t, v, y = _inputs(8)
    if isinstance(model, MLP):
        z, v = z.flatten(1), v.flatten(1)
    r[::2] = t[::2]  # half the rows r = t

    def step(backend):
        model.zero_grad()
        objective = MeanFlow(TimeSampler(), jvp="subset", jvp_backend=backend)
        out = objective(model, z, y, noise=v, r=r, t=t)
        out.loss.backward()
        return out, torch.cat([p.grad.flatten() for p in model.parameters()])

    ref, ref_grad = step("func")
    calls = []
    original = type(model).tangent_forward
    monkeypatch.setattr(
        type(model),
        "tangent_forward",
        lambda self, *a, **k: calls.append(k["rows"]) or original(self, *a, **k),
    )
    out, grad = step("forward-ad")
    assert len(calls) == 1 and sorted(calls[0].tolist()) == [1, 3, 5, 7]
    assert torch.allclose(out.target, ref.target, rtol=1e-10, atol=1e-10)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-10)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_unet_dropout_uses_the_values_mask_in_the_tangent():
    """In training mode the pass's tangent is the derivative of the pass with that same mask:
    central differences of the same seeded pass agree with it (a fresh mask would not)."""
    model = _model("unet-labels").train()
    z, r, t, v, y = _inputs()
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)

    def run(z_, t_):
        torch.manual_seed(5)
        return model.tangent_forward(z_, r, t_, y, dz=v, dr=zeros, dt=ones)

    u, du = run(z, t)
    h = 1e-6
    fd = (run(z + h * v, t + h)[0] - run(z - h * v, t - h)[0]) / (2 * h)
    assert torch.allclose(du, fd, rtol=1e-6, atol=1e-7 * du.abs().max().item())
    torch.manual_seed(6)  # another mask: another function
    assert not torch.allclose(u, model.tangent_forward(z, r, t, y, dz=v, dr=zeros, dt=ones)[0])


def _dual_check(fn, primals, tangents):
    """Tangent and gradients of ``fn`` with the lean rules against PyTorch's own rules."""
    results = []
    for pytorch_rules in (False, True):
        args = [p.detach().clone().requires_grad_() for p in primals]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, d) if d is not None else a for a, d in zip(args, tangents)]
            if pytorch_rules:
                with torch_rules():
                    out = fn(*duals)
            else:
                out = fn(*duals)
            value, tangent = fwAD.unpack_dual(out)
        grads = torch.autograd.grad(value.sin().sum(), args)
        results.append((value.detach(), tangent.detach(), grads))
    (v1, t1, g1), (v2, t2, g2) = results
    assert torch.equal(v1, v2)
    assert torch.allclose(t1, t2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("absent", [None, 0, 1, 2])
def test_fused_adaln_ops_match_pytorch_rules(absent):
    g = torch.Generator().manual_seed(2)
    x, f = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for fn, primals in ((modulate, (x, a, b)), (gated_add, (x, a, f))):
        tangents = [torch.randn_like(p) for p in primals]
        if absent is not None:
            tangents[absent] = None
        _dual_check(fn, primals, tangents)
    s = torch.rand(6, generator=g, dtype=torch.float64)
    freqs = torch.rand(4, generator=g, dtype=torch.float64) * 10
    _dual_check(lambda s_: sinusoid(s_, freqs), (s,), (torch.randn_like(s),))
