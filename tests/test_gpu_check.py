"""benchmarks/gpu_check.py in its CPU smoke mode (--tiny): every section runs and is recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                           "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overall: PASS" in proc.stdout
    res = json.loads(out.read_text())
    for key in ("device_name", "torch", "jvp", "train", "step_time", "sampling", "pass",
                "seconds"):
        assert key in res, key
    assert res["pass"] is True and res["tiny"] is True
    assert _finite_numbers(res), "a NaN or Inf in the results"

    jvp = res["jvp"]
    assert jvp["dudt_norm"] > 0 and jvp["u_norm"] > 0  # zero-initialised layers were filled
    # the fp64 JVP against an independent central difference (eps 1e-5): agreement to the
    # difference's own O(eps^2) error, but not bit-identical (two different computations)
    assert 1e-14 < jvp["fp64_vs_fd_rel_err"] < 1e-6 and jvp["fp64_pass"] is True
    # float32 rounding (unit 6e-8) is seen and is far coarser in bf16 (unit 4e-3)
    assert 1e-9 < jvp["fp32_vs_fp64_rel_err"] < 1e-4
    assert 100 * jvp["fp32_vs_fp64_rel_err"] < jvp["bf16_autocast_vs_fp64_rel_err"] < 0.1

    train = res["train"]
    settings = res["settings"]
    assert train["finite"] is True and train["nan_steps"] == 0 and train["steps"] == 10
    # DiT's output starts at zero, so the first targets are v = e - x for x, e ~ N(0, I):
    # E|v|^2 = 2 D with D = 4 * 8 * 8 (the gpu_check data are standard normal latents)
    dim = 4 * settings["input_size"] ** 2
    assert train["mse_start"] == pytest.approx(2 * dim, rel=0.15)
    # adaptive weighting p = 1, c = 1e-3: each loss is err / (err + c) = 1 - c / (err + c)
    for when in ("start", "end"):
        mse = train[f"mse_{when}"]
        assert train[f"loss_{when}"] == pytest.approx(mse / (mse + 1e-3), abs=3e-7), when
    assert train["images_per_s"] == pytest.approx(train["batch"] * 10 / train["seconds"])

    step_time = res["step_time"]
    rows = {row["objective"]: row for row in step_time["rows"]}
    assert set(rows) == {"flow matching", "MeanFlow (fp32 JVP)", "MeanFlow (bf16 JVP)"}
    fm = rows["flow matching"]["ms_per_step"]
    for row in rows.values():
        assert row["ms_per_step"] > 0
        # images/s and the ratio follow from the recorded median step time
        assert row["images_per_s"] == pytest.approx(step_time["batch"] * 1e3 / row["ms_per_step"])
        assert row["ratio_to_flow_matching"] == pytest.approx(row["ms_per_step"] / fm)
        assert row["timed_steps"] == settings["rounds"] * settings["steps_per_round"]
        assert "peak_mib" not in row  # CUDA only
    assert rows["flow matching"]["ratio_to_flow_matching"] == 1.0

    sampling = res["sampling"]
    assert sampling["samples_finite"] is True
    assert sampling["ms_one_step"] > 0 and sampling["ms_forward"] > 0
    assert sampling["ratio_sample_to_forward"] == pytest.approx(
        sampling["ms_one_step"] / sampling["ms_forward"])
    assert sampling["one_step_images_per_s"] == pytest.approx(
        sampling["batch"] * 1e3 / sampling["ms_one_step"])
    assert sampling["forward_images_per_s"] == pytest.approx(
        sampling["batch"] * 1e3 / sampling["ms_forward"])
