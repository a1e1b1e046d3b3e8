"""Mixed precision: under bf16 autocast the JVP still runs in float32 by default (the same
du/dt as without autocast), ``jvp_dtype="autocast"`` runs it in bf16, and a bf16 training run
of a small DiT stays finite."""

import json

import torch
from cli_helpers import run

from meanflow.flow.jvp import total_derivative
from meanflow.nn import dit
from meanflow.objectives.meanflow import MeanFlow


def _inputs():
    torch.manual_seed(0)
    model = dit("T/2", input_size=8, in_channels=4, num_classes=0)
    for p in model.parameters():  # DiT zero-initialises its output: give it some signal
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.rand(4, generator=g) * 0.8 + 0.2
    return model, z, t * 0.5, t, v


def test_the_jvp_stays_float32_under_bf16_autocast():
    model, z, r, t, v = _inputs()
    _, exact = total_derivative(model, z, r, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u32, d32 = total_derivative(model, z, r, t, v)
        u16, d16 = total_derivative(model, z, r, t, v, autocast=True)
    assert u32.dtype == d32.dtype == torch.float32
    assert torch.equal(d32, exact)  # autocast switched off inside: bit for bit the fp32 JVP
    error = float((d16 - exact).norm() / exact.norm())
    assert 1e-4 < error < 0.1  # the bf16 JVP is measurably, not wildly, different


def test_objective_passes_jvp_dtype_through():
    model, z, r, t, v = _inputs()
    x = z - t[:, None, None, None] * v
    kwargs = dict(noise=torch.randn_like(x), r=r, t=t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = MeanFlow(jvp="full")(model, x, **kwargs).target
        b = MeanFlow(jvp="full", jvp_dtype="autocast")(model, x, **kwargs).target
    plain = MeanFlow(jvp="full")(model, x, **kwargs).target
    assert torch.equal(a, plain) and not torch.equal(b, plain)


def test_bf16_training_run_is_finite(tmp_path, capsys):
    x = torch.randn(64, 4, 8, 8).numpy()
    import numpy as np
    np.save(tmp_path / "lat.npy", x)
    code, out, err = run(capsys, "train", "--data", str(tmp_path / "lat.npy"), "--out",
                         str(tmp_path / "run"), "--preset", "unet-small", "--set",
                         "model.arch=dit", "--set", "model.size=T/2", "--steps", "4",
                         "--batch-size", "16", "--set", "precision=bf16", "--quiet",
                         "--set", "grid_every=0", "--set", "grid_num=4")
    assert code == 0, err
    result = json.loads(out)
    assert result["skipped_steps"] == 0 and result["loss"] == result["loss"]
