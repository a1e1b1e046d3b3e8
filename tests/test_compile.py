"""torch.compile on CPU: ``--set compile=true`` training against eager, and whether the JVP
itself can be compiled on this PyTorch.

Findings on PyTorch 2.13 (CPU), which these tests pin:
- ``torch.func.jvp`` over a ``torch.compile``-d module, called from eager code, is not traced
  (dynamo: "Calling torch.func.jvp(compiled_fn) function from eager mode is not supported",
  pytorch/pytorch#128711): the network runs eagerly (when the JVP is the first call, dynamo
  marks the network's frame as skipped and compiles at most small frames inside its layers),
  so a bare ``torch.compile(model)`` gains nothing.
  The trainer therefore wraps the network in ``CompiledForward`` (train/loop.py): plain forwards
  compiled, calls inside the JVP eager.
- Compiling a function that contains ``torch.func.jvp`` works for the forward, but the backward
  through its primal output fails in Inductor with "ZeroTensors are immutable"
  (pytorch/pytorch#177261); ``test_jvp_inside_compile`` is skipped with that reason while it does.
- A compiled module under forward-AD dual tensors returns no tangent (refused by the forward-ad
  back-end).

Measured again on 2.13 and 2.15 (docs/benchmarks.md section 12): with today's layers (custom
``jvp`` rules) ``test_jvp_inside_compile`` passes on both; on 2.15 dynamo graph-breaks on the
custom ``jvp`` and runs the JVP eagerly. On 2.15 a compiled module under dual tensors
graph-breaks on the dual inputs and runs eagerly, so it gives the eager du/dt instead of none.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from meanflow import MeanFlow, TimeSampler
from meanflow.errors import MeanFlowError
from meanflow.nn import MLP
from meanflow.train import TrainConfig, configure, train

STEPS = 6
# compiled (Inductor, C++ kernels) against eager float32 on the same tiny MLP: the kernels
# reorder sums, so losses agree to rounding, which a few Adam steps barely amplify
RTOL = 1e-4


def _no_compiler_reason() -> str | None:
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("gcc") is None:
        return "torch.compile (Inductor) needs a C++ compiler on CPU; none found on PATH"
    return None


pytestmark = pytest.mark.skipif(_no_compiler_reason() is not None,
                                reason=str(_no_compiler_reason()))


def _losses(tmp_path, name: str, compile_: bool) -> list[float]:
    """Per-step loss and gradient norm; p = 0 makes the loss the plain squared error (with p = 1
    it is err / (err + c), about 1 whatever the network does)."""
    cfg = configure(TrainConfig(), "tiny", [("data", "rings"), ("steps", STEPS), ("log_every", 1),
                                            ("ckpt_every", STEPS), ("time.ratio", 0.5),
                                            ("loss.p", 0.0), ("compile", compile_)])
    result = train(cfg, str(tmp_path / name), progress=False)
    assert result.step == STEPS and result.skipped_steps == 0
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def test_compile_true_training_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # forget frames an earlier test may have marked as skipped
    counters.clear()
    eager = _losses(tmp_path, "eager", False)
    compiled = _losses(tmp_path, "compiled", True)
    assert counters["frames"]["ok"] > 0, "compile=true compiled no frame at all"
    assert [v for row in compiled for v in row] == pytest.approx(
        [v for row in eager for v in row], rel=RTOL)
    torch._dynamo.reset()


def _jvp(model, z, r, t, v):
    return torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_), (z, r, t),
                          (v, torch.zeros_like(r), torch.ones_like(t)))


def test_jvp_inside_compile():
    """The MeanFlow target with the JVP inside the compiled function, forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(2, hidden=32, depth=2)
    z, v = torch.randn(16, 2), torch.randn(16, 2)
    r = 0.5 * torch.rand(16)
    t = r + 0.5 * torch.rand(16)
    u_e, d_e = _jvp(model, z, r, t, v)
    u_e.pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    u_c, d_c = torch.compile(_jvp)(model, z, r, t, v)
    try:
        u_c.pow(2).sum().backward()
    except RuntimeError as e:
        torch._dynamo.reset()
        if "ZeroTensors are immutable" in str(e):
            pytest.skip(f"torch {torch.__version__}: the forward of a compiled torch.func.jvp "
                        "works, its backward fails in Inductor with 'ZeroTensors are immutable' "
                        "(pytorch/pytorch#177261); the trainer compiles plain forwards only")
        raise
    torch._dynamo.reset()
    torch.testing.assert_close(u_c, u_e, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(d_c, d_e, rtol=RTOL, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=RTOL, atol=1e-6)


def test_objective_on_compiled_module_runs_jvp_eagerly():
    """What a bare ``torch.compile(model)`` does under the objective with ``torch.func``: the
    JVP is not traced (if a future PyTorch traces it, the trainer's CompiledForward can go),
    and the loss is still the eager one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MLP(2, hidden=32, depth=2)
    x = torch.randn(32, 2)
    objective = MeanFlow(TimeSampler(ratio=1.0), jvp_backend="func")
    out = objective(torch.compile(model), x, generator=torch.Generator().manual_seed(0))
    unsupported = sum(n for k, n in counters["unimplemented"].items() if "functorch" in k)
    torch._dynamo.reset()
    eager = objective(model, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.loss, eager.loss, rtol=RTOL, atol=1e-6)
    if unsupported == 0:
        pytest.skip("this PyTorch traced torch.func.jvp over a compiled module: "
                    "CompiledForward in train/loop.py may no longer be needed")


def test_compiled_module_under_dual_tensors_is_refused_or_exact():
    """A compiled module under forward-AD dual tensors. PyTorch 2.13 returns its output without
    the tangent: the forward-ad back-end must say so instead of training on du/dt = 0.
    PyTorch 2.15 graph-breaks on dual-tensor inputs and runs the module eagerly: the loss (all
    rows r != t here, so it depends on du/dt) must then be the uncompiled module's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = MLP(2, hidden=32, depth=2)
    # p = 0: the plain squared error, so a wrong du/dt shows in the loss (p = 1 flattens it)
    objective = MeanFlow(TimeSampler(ratio=1.0), p=0.0, jvp_backend="forward-ad")
    x = torch.randn(32, 2)
    try:
        try:
            out = objective(torch.compile(plain), x, generator=torch.Generator().manual_seed(0))
        except MeanFlowError as e:
            assert "no forward-mode tangent" in str(e)
            return
        eager = objective(plain, x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.loss, eager.loss, rtol=RTOL, atol=1e-6)
    finally:
        torch._dynamo.reset()
