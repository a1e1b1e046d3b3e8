"""benchmarks/gpu_check.py in its CPU smoke mode (--tiny): every section runs and is recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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
    assert jvp["dudt_norm"] > 0  # the zero-initialised layers were filled: a real derivative
    assert jvp["fp64_vs_fd_rel_err"] < 1e-6 and jvp["fp64_pass"] is True
    assert jvp["fp32_vs_fp64_rel_err"] < 1e-3
    assert 0 < jvp["bf16_autocast_vs_fp64_rel_err"] < 0.1

    train = res["train"]
    assert train["finite"] is True and train["nan_steps"] == 0 and train["steps"] == 10
    for key in ("loss_start", "loss_end", "mse_start", "mse_end", "images_per_s"):
        assert train[key] > 0, key

    rows = {row["objective"]: row for row in res["step_time"]["rows"]}
    assert set(rows) == {"flow matching", "MeanFlow (fp32 JVP)", "MeanFlow (bf16 JVP)"}
    assert rows["flow matching"]["ratio_to_flow_matching"] == 1.0
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0
        assert "peak_mib" not in row  # CUDA only

    sampling = res["sampling"]
    assert sampling["samples_finite"] is True
    assert sampling["ratio_sample_to_forward"] > 0
    assert sampling["one_step_images_per_s"] > 0 and sampling["forward_images_per_s"] > 0
