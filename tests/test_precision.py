"""Mixed precision: under bf16 autocast the JVP still runs in float32 by default (the same
du/dt as without autocast), ``jvp_dtype="autocast"`` runs it in bf16, and a bf16 training run
of a small DiT runs its forward in bf16 and its JVP in float32, stays finite and close to the
fp32 run of the same seed."""

import json
import math

import numpy as np
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


def _latents(tmp_path) -> str:
    """64 seeded N(0, I) "latents" of shape 4x8x8 in an .npy file."""
    path = tmp_path / "lat.npy"
    np.save(path, torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)).numpy())
    return str(path)


def _train(capsys, data, out, *sets):
    """Run ``meanflow train`` (4 steps of DiT-T/2, seed fixed by the preset) in this process and
    record ``(inside a forward-mode JVP, output dtype)`` of every Linear of the network while it
    trains. Returns the printed result, the per-step losses and those pairs."""
    from torch.autograd.forward_ad import unpack_dual

    seen = set()

    def hook(module, args, output):
        if module.training and isinstance(module, torch.nn.Linear):
            seen.add((unpack_dual(output).tangent is not None, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        code, printed, err = run(capsys, "train", "--data", data, "--out", out, "--preset",
                                 "unet-small", "--set", "model.arch=dit", "--set",
                                 "model.size=T/2", "--steps", "4", "--batch-size", "16",
                                 "--quiet", "--set", "grid_every=0", "--set", "grid_num=4",
                                 "--set", "log_every=1", *sets)
    finally:
        handle.remove()
    assert code == 0, err
    with open(f"{out}/metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 4
    return json.loads(printed), losses, seen


def test_bf16_training_run_is_finite_and_close_to_fp32(tmp_path, capsys):
    """The same seed and steps in fp32 and bf16: in bf16 the network's plain forward runs in
    bfloat16 and its JVP in float32 (autocast off inside); the losses stay within 1e-3 of the
    fp32 ones at every step, and the weights differ (bf16 really ran) by less than 1e-4."""
    from meanflow.runs.checkpoint import load_latest_good

    data = _latents(tmp_path)
    result32, losses32, seen32 = _train(capsys, data, str(tmp_path / "fp32"))
    result16, losses16, seen16 = _train(capsys, data, str(tmp_path / "bf16"),
                                        "--set", "precision=bf16")
    assert seen32 == {(True, torch.float32), (False, torch.float32)}
    assert seen16 == {(True, torch.float32), (False, torch.bfloat16)}
    assert result16["skipped_steps"] == result32["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in losses16)
    assert result16["loss"] == losses16[-1] and result32["loss"] == losses32[-1]
    for a, b in zip(losses16, losses32):
        assert abs(a - b) <= 1e-3 * abs(b), (losses16, losses32)
    _, w16, _ = load_latest_good(str(tmp_path / "bf16"))
    _, w32, _ = load_latest_good(str(tmp_path / "fp32"))
    keys = [k for k in w32 if k.startswith("model.")]
    assert keys and all(w16[k].dtype == torch.float32 for k in keys)  # fp32 master weights
    diff = sum(float((w16[k] - w32[k]).norm()) ** 2 for k in keys) ** 0.5
    norm = sum(float(w32[k].norm()) ** 2 for k in keys) ** 0.5
    assert 0 < diff < 1e-4 * norm


def test_bf16_with_an_autocast_jvp_runs_the_jvp_in_bf16(tmp_path, capsys):
    _, losses, seen = _train(capsys, _latents(tmp_path), str(tmp_path / "run"),
                             "--set", "precision=bf16", "--set", "loss.jvp_dtype=autocast")
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}
    assert all(math.isfinite(v) for v in losses)
