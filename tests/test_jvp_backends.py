"""JVP back-ends (``loss.jvp_backend``): func, forward-ad and finite-difference."""

import pytest
import torch
from conftest import jvp_inputs, perturbed

from meanflow import MeanFlow, MeanFlowError
from meanflow.flow.jvp import FD_STEP, total_derivative
from meanflow.nn import MLP, dit, unet

EXACT = ("func", "forward-ad")
# measured float32 relative error bounds of the default steps (docs/method.md, "JVP back-ends")
FD_BOUND = {"forward": 2e-2, "central": 1e-3}


def _net(name, dtype=torch.float64):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(3, hidden=32, depth=3).to(dtype), (3,)
    if name == "dit":
        return perturbed(dit("T/2", input_size=8, in_channels=4)).to(dtype), (4, 8, 8)
    return perturbed(unet("tiny", 1, 8)).eval().to(dtype), (1, 8, 8)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("name", ["mlp", "dit", "unet"])
def test_exact_backends_match_float64_central_differences(backend, name):
    model, shape = _net(name)
    z, r, t, v, _ = jvp_inputs(shape, 4)
    u, dudt = total_derivative(model, z, r, t, v, backend=backend)
    h = 1e-5
    fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-7, rtol=1e-6)
    assert u.requires_grad and not dudt.requires_grad
    assert torch.allclose(u, model(z, r, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("name", ["mlp", "dit", "unet"])
def test_finite_difference_float32_error_is_within_the_documented_bound(scheme, name):
    model, shape = _net(name)
    z, r, t, v, _ = jvp_inputs(shape, 8)
    t[0], t[1], r[1] = 1.0, 0.0, 0.0  # the ends: forward steps back, central one-sided
    _, exact = total_derivative(model, z, r, t, v)
    u, dudt = total_derivative(model.float(), *(a.float() for a in (z, r, t, v)),
                               backend="finite-difference", fd_scheme=scheme)
    assert u.requires_grad and not dudt.requires_grad and dudt.dtype == torch.float32
    # rows 0, 1 lie at the ends, where both schemes are one-sided (first order)
    assert _rel(dudt[2:], exact[2:]) < FD_BOUND[scheme]
    assert _rel(dudt[:2], exact[:2]) < FD_BOUND["forward"] * FD_STEP[scheme] / FD_STEP["forward"]
    # a smaller step than the default is worse in float32 (round-off), so the check can fail
    _, tiny = total_derivative(model, *(a.float() for a in (z, r, t, v)),
                               backend="finite-difference", fd_scheme=scheme,
                               fd_step=FD_STEP[scheme] / 1000)
    assert _rel(tiny[2:], exact[2:]) > _rel(dudt[2:], exact[2:])


def _step(model, backend="func", jvp="full", seed=1, shape=(3,), **kw):
    model.zero_grad()
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, *shape, generator=g, dtype=dtype)
    out = MeanFlow(jvp=jvp, jvp_backend=backend, **kw)(model, x, generator=g)
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out, grad


@pytest.mark.parametrize("name", ["mlp", "dit"])
def test_exact_backends_give_the_full_batch_func_loss_and_gradients(name):
    model, shape = _net(name)
    ref, ref_grad = _step(model, shape=shape)
    assert bool((ref.r < ref.t).any()) and bool((ref.r == ref.t).any())
    for backend in EXACT:
        for jvp in ("full", "subset", "detached"):
            out, grad = _step(model, backend, jvp, shape=shape)
            assert torch.allclose(out.target, ref.target, rtol=1e-6, atol=1e-12)
            assert torch.allclose(out.loss, ref.loss, rtol=1e-6)
            assert torch.allclose(grad, ref_grad, rtol=1e-6, atol=1e-10)


def test_func_and_forward_ad_agree_in_float32():
    model, shape = _net("mlp", torch.float32)
    a, grad_a = _step(model, "func", "subset")
    b, grad_b = _step(model, "forward-ad", "subset")
    assert torch.allclose(a.target, b.target, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad_a, grad_b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_finite_difference_objective_is_close_to_exact(scheme):
    model, shape = _net("dit", torch.float32)
    ref, ref_grad = _step(model, shape=shape)
    out, grad = _step(model, "finite-difference", "subset", shape=shape, fd_scheme=scheme)
    assert _rel(out.loss, ref.loss) < FD_BOUND[scheme]
    assert _rel(grad, ref_grad) < FD_BOUND[scheme]


def test_backend_options_are_checked():
    for bad in (dict(jvp_backend="jax"), dict(fd_scheme="backward"), dict(fd_step=0.0)):
        with pytest.raises(MeanFlowError):
            MeanFlow(**bad)


def test_the_loop_refuses_finite_differences_with_dropout(tmp_path, capsys):
    from test_train_images import make_class_folder

    from meanflow.cli import main
    data = str(make_class_folder(tmp_path / "data", per_class=2))
    assert main(["train", "--data", data, "--out", str(tmp_path / "run"), "--quiet",
                 "--batch-size", "4", "--set", "model.dropout=0.1", "--set",
                 "loss.jvp_backend=finite-difference"]) == 2
    assert "finite-difference" in capsys.readouterr().err


def test_config_keys_reach_the_objective_and_are_validated():
    from meanflow.config.build import build_objective
    from meanflow.config.schema import TrainConfig

    cfg = TrainConfig()
    cfg.loss.jvp_backend, cfg.loss.fd_scheme = "finite-difference", "central"
    cfg.validate()
    obj = build_objective(cfg)
    assert (obj.jvp_backend, obj.fd_step, obj.fd_scheme) == ("finite-difference", None, "central")
    assert build_objective(cfg, num_classes=3).jvp_backend == "finite-difference"
    cfg.loss.jvp_backend = "jax"
    with pytest.raises(MeanFlowError):
        cfg.validate()


def test_finite_differences_do_not_split_the_batch():
    """The finite-difference objective runs one forward with graph on the whole batch (as flow
    matching) and one no-grad pass on the r != t rows only (forward scheme)."""
    from meanflow import MeanFlow, TimeSampler
    from meanflow.nn import MLP

    calls = []

    class Counting(MLP):
        def forward(self, z, r, t, y=None):
            calls.append((len(z), torch.is_grad_enabled()))
            return super().forward(z, r, t, y=y)

    torch.manual_seed(0)
    model = Counting(2, hidden=16, depth=2)
    objective = MeanFlow(TimeSampler(ratio=0.5), jvp_backend="finite-difference")
    draws = objective.draw(32, (2,), generator=torch.Generator().manual_seed(0))
    out = objective(model, torch.randn(32, 2), **draws.kwargs())
    distinct = int((draws.r < draws.t).sum())
    assert 0 < distinct < 32
    assert calls == [(32, True), (distinct, False)]
    out.loss.backward()
