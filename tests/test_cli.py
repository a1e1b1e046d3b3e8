"""End-to-end behaviour of the ``meanflow`` command on tiny runs (seconds each)."""

import json
import os

import numpy as np
import pytest
import torch
from cli_helpers import run
from safetensors.torch import load_file

from meanflow.cli import build_parser, main
from meanflow.runs.checkpoint import latest_checkpoint


def test_train_writes_a_self_describing_run(tiny_run):
    names = set(os.listdir(tiny_run))
    assert {"config.json", "metrics.jsonl", "checkpoints", "samples-1step.png"} <= names
    config = json.load(open(os.path.join(tiny_run, "config.json")))
    assert config["preset"] == "tiny" and config["time"]["ratio"] == 0.25
    records = [json.loads(line) for line in open(os.path.join(tiny_run, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    assert all(np.isfinite(r["loss"]) and r["steps_per_s"] > 0 for r in records)
    stem = latest_checkpoint(tiny_run)
    assert stem.endswith("step-00000050")
    tensors = load_file(stem + ".safetensors")
    assert any(k.startswith("ema.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    assert len(os.listdir(os.path.join(tiny_run, "checkpoints"))) == 4  # 2 kept x (json + st)


def test_sample_npy_png_and_one_step_formula(tiny_run, tmp_path, capsys):
    from meanflow.runs.noise import sample_noise
    from meanflow.train import load_run

    npy = str(tmp_path / "s.npy")
    code, out, _ = run(capsys, "sample", "--run", tiny_run, "--num", "300", "--out", npy)
    assert code == 0 and json.loads(out)["weights"] == "ema"
    points = np.load(npy)
    assert points.shape == (300, 2) and points.dtype == np.float32
    # the written samples are e - u(e, 0, 1) of the EMA network, in data units
    loaded = load_run(tiny_run)
    e = sample_noise((2,), seed=0, start=0, stop=300)  # per-chunk generators (runs/noise.py)
    with torch.no_grad():
        x = e - loaded.model(e, torch.zeros(300), torch.ones(300))
    assert np.allclose(points, loaded.normalizer.decode(x).numpy(), atol=1e-5)
    png = str(tmp_path / "s.png")
    assert run(capsys, "sample", "--run", tiny_run, "--num", "200", "--steps", "2", "--out", png)[0] == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_prints_one_json_line(tiny_run, capsys):
    code, out, _ = run(capsys, "eval", "--run", tiny_run, "--reference", "eight-gaussians",
                       "--num", "500", "--steps", "2")
    assert code == 0 and len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert {"swd", "energy_distance", "steps", "num"} <= set(result)
    assert result["steps"] == 2 and result["num"] == 500 and result["swd"] > 0


def test_resume_is_bitwise_identical(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    base = ["--data", "two-moons", "--preset", "tiny", "--quiet", "--set", "ckpt_every=20"]
    assert main(["train", "--out", full, *base, "--steps", "40"]) == 0
    assert main(["train", "--out", part, *base, "--steps", "20"]) == 0
    assert main(["train", "--out", part, "--resume", "--steps", "40", "--quiet"]) == 0
    a = load_file(latest_checkpoint(full) + ".safetensors")
    b = load_file(latest_checkpoint(part) + ".safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_flow_matching_objective_and_user_array(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(600, 3)).astype(np.float32) * 2 + 1
    np.save(tmp_path / "x.npy", data)
    out = str(tmp_path / "fm")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "x.npy"), "--out", out,
                       "--objective", "flow-matching", "--steps", "20", "--batch-size", "64",
                       "--set", "model.hidden=16", "--quiet")
    assert code == 0 and "using 'vectors'" in err
    assert json.load(open(os.path.join(out, "config.json")))["objective"] == "flow-matching"
    code, out_json, _ = run(capsys, "eval", "--run", out, "--reference", str(tmp_path / "x.npy"),
                            "--num", "100", "--steps", "4")
    assert code == 0 and json.loads(out_json)["reference_num"] == 600


def test_short_training_learns(tmp_path, capsys):
    """300 seeded steps on a shifted, stretched Gaussian (no standardization) move one-step
    samples far closer to the data than the untrained network's."""
    from meanflow.data import load_vectors
    from meanflow.eval import energy_distance
    from meanflow.train import load_run

    rng = np.random.default_rng(0)
    data = rng.normal(size=(4000, 2)) * np.array([0.5, 2.0]) + np.array([3.0, -2.0])
    np.save(tmp_path / "g.npy", data.astype(np.float32))
    out = str(tmp_path / "learn")
    assert run(capsys, "train", "--data", str(tmp_path / "g.npy"), "--out", out, "--preset",
               "tiny", "--steps", "300", "--set", "normalize=false", "--set", "optim.lr=3e-3",
               "--set", "loss.p=0", "--set", "time.dist=uniform", "--set", "ema_decay=0.99",
               "--quiet")[0] == 0
    reference = load_vectors(str(tmp_path / "g.npy"))[:2000]
    trained = load_run(out)
    before = load_run(out)
    for p in before.model.parameters():
        torch.nn.init.zeros_(p)  # u = 0: one step returns the noise itself
    ed_trained = energy_distance(trained.sample(2000, seed=1), reference)
    ed_before = energy_distance(before.sample(2000, seed=1), reference)
    assert ed_trained < 0.2 * ed_before, (ed_trained, ed_before)
    assert np.allclose(trained.sample(2000, seed=1).mean(axis=0), [3.0, -2.0], atol=0.6)


def _bad(tmp_path, tiny_run):
    arr = tmp_path / "nan.npy"
    x = np.ones((100, 2))
    x[5, 0] = np.nan
    np.save(arr, x)
    small = tmp_path / "small.npy"
    np.save(small, np.ones((10, 2)))
    existing = tmp_path / "exists.npy"
    existing.write_bytes(b"keep me")
    d = str(tmp_path / "new")
    t = ["train", "--out", d, "--quiet"]
    return {
        "unknown data": [*t, "--data", "checkerbord"],
        "missing file": [*t, "--data", str(tmp_path / "nope.npy")],
        "nan data": [*t, "--data", str(arr)],
        "batch > data": [*t, "--data", str(small), "--batch-size", "64"],
        "unknown key": [*t, "--data", "rings", "--set", "time.rato=0.5"],
        "bad value": [*t, "--data", "rings", "--set", "optim.lr=fast"],
        "ratio > 1": [*t, "--data", "rings", "--set", "time.ratio=1.5"],
        "negative steps": [*t, "--data", "rings", "--steps", "-5"],
        "no equals": [*t, "--data", "rings", "--set", "steps"],
        "group key": [*t, "--data", "rings", "--set", "time=3"],
        "unknown preset": [*t, "--data", "rings", "--preset", "toy2d"],
        "existing run": ["train", "--out", tiny_run, "--data", "rings", "--quiet"],
        "resume nothing": [*t, "--resume"],
        "resume changes": ["train", "--out", tiny_run, "--resume", "--data", "rings"],
        "resume fewer steps": ["train", "--out", tiny_run, "--resume", "--steps", "10", "--quiet"],
        "sample exists": ["sample", "--run", tiny_run, "--num", "5", "--out", str(existing)],
        "sample ext": ["sample", "--run", tiny_run, "--num", "5", "--out", str(tmp_path / "a.txt")],
        "sample schedule": ["sample", "--run", tiny_run, "--num", "5", "--schedule", "0,1",
                            "--out", str(tmp_path / "b.npy")],
        "sample no run": ["sample", "--run", str(tmp_path / "none"), "--num", "5",
                          "--out", str(tmp_path / "c.npy")],
        "eval dims": ["eval", "--run", tiny_run, "--reference", str(small.with_name("x3.npy")),
                      "--num", "10"],
        "misspelled flag": [*t, "--data", "rings", "--stpes", "5"],
        "wrong flag type": [*t, "--data", "rings", "--steps", "many"],
        "out is a file": ["train", "--out", str(existing), "--data", "rings", "--quiet"],
        "resume other preset": ["train", "--out", tiny_run, "--resume", "--preset", "toy-2d"],
        "other architecture": ["sample", "--run", _other_architecture(tmp_path, tiny_run),
                               "--num", "5", "--out", str(tmp_path / "d.npy")],
        "zero batch": [*t, "--data", "rings", "--batch-size", "0"],
    }


def _other_architecture(tmp_path, tiny_run):
    """A copy of the run whose checkpoint claims a wider network than its weights hold."""
    import shutil

    copy = tmp_path / "other-arch"
    if not copy.exists():
        shutil.copytree(tiny_run, copy)
        stem = latest_checkpoint(str(copy))
        meta = json.load(open(stem + ".json"))
        meta["config"]["model"]["hidden"] = 64
        json.dump(meta, open(stem + ".json", "w"))
    return str(copy)


BAD_CASES = ["unknown data", "missing file", "nan data", "batch > data", "unknown key",
             "bad value", "ratio > 1", "negative steps", "no equals", "group key",
             "unknown preset", "existing run", "resume nothing", "resume changes",
             "resume fewer steps", "sample exists", "sample ext", "sample schedule",
             "sample no run", "eval dims", "misspelled flag", "wrong flag type", "out is a file",
             "resume other preset", "other architecture", "zero batch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, tmp_path, tiny_run, capsys):
    np.save(tmp_path / "x3.npy", np.ones((50, 3)))
    argv = _bad(tmp_path, tiny_run)[case]
    before = {n: os.path.getmtime(os.path.join(tiny_run, n)) for n in os.listdir(tiny_run)}
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("meanflow: error")]
    assert len(lines) == 1 and "Traceback" not in err
    assert {n: os.path.getmtime(os.path.join(tiny_run, n)) for n in os.listdir(tiny_run)} == before
    assert (tmp_path / "exists.npy").read_bytes() == b"keep me"
    if case == "unknown key":
        assert "time.ratio" in lines[0]
    if case == "misspelled flag":
        assert "did you mean --steps?" in lines[0]


def test_help_documents_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    parsers = {name: sub[name] for name in ("train", "sample", "eval")}
    parsers["features train"] = sub["features"]._subparsers._group_actions[0].choices["train"]
    parsers["latents encode"] = sub["latents"]._subparsers._group_actions[0].choices["encode"]
    for name in ("convert", "ablate", "export"):
        parsers[name] = sub[name]
    for name, p in parsers.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
    assert {"train", "sample", "eval", "features", "latents", "convert", "ablate",
            "export"} == set(sub)


def test_cli_reference_is_current():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rendered = subprocess.run([sys.executable, os.path.join(root, "scripts", "cli_doc.py")],
                              capture_output=True, text=True, check=True).stdout
    assert "## meanflow export" in rendered and "--overwrite" in rendered
    with open(os.path.join(root, "docs", "cli.md")) as f:
        assert f.read() == rendered, "run: python scripts/cli_doc.py > docs/cli.md"


def test_library_packages_parse_no_arguments():
    """Commands live in meanflow.cli; train/ and eval/ are library code without argparse."""
    import ast

    import meanflow

    base = os.path.dirname(meanflow.__file__)
    for package in ("train", "eval"):
        for name in sorted(os.listdir(os.path.join(base, package))):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(base, package, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] == "argparse" for n in names), (package, name)
                assert not any(".cli" in n or n == "cli" for n in names), (package, name)


def test_configuration_doc_is_current_and_complete():
    import subprocess
    import sys

    from meanflow.config.help import KEY_HELP
    from meanflow.config.presets import PRESET_HELP, PRESETS
    from meanflow.config.schema import config_keys
    assert set(KEY_HELP) == set(config_keys()) and set(PRESET_HELP) == set(PRESETS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rendered = subprocess.run([sys.executable, os.path.join(root, "scripts", "config_doc.py")],
                              capture_output=True, text=True, check=True).stdout
    with open(os.path.join(root, "docs", "configuration.md")) as f:
        assert f.read() == rendered, "run: python scripts/config_doc.py > docs/configuration.md"


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, capsys):
    """Data of magnitude 1e30 overflows the float32 squared error: every step is non-finite, is
    skipped (no optimizer step, no checkpoint), and the run stops with one clear line."""
    np.save(tmp_path / "huge.npy", np.full((256, 2), 1e30, dtype=np.float32))
    out = str(tmp_path / "nan")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "huge.npy"), "--out", out,
                       "--preset", "tiny", "--set", "normalize=false", "--quiet")
    assert code == 2 and "consecutive non-finite steps at step 0" in err
    assert not os.path.exists(os.path.join(out, "checkpoints"))


@pytest.mark.parametrize("damage", ["truncated", "pickle", "json"])
def test_damaged_checkpoint_is_named_in_one_line(damage, tmp_path, capsys):
    import pickle
    import shutil

    run_dir = str(tmp_path / "run")
    assert run(capsys, "train", "--data", "rings", "--out", run_dir, "--preset", "tiny",
               "--steps", "10", "--quiet")[0] == 0
    stem = latest_checkpoint(run_dir)
    if damage == "truncated":
        data = open(stem + ".safetensors", "rb").read()
        open(stem + ".safetensors", "wb").write(data[: len(data) // 2])
    elif damage == "pickle":
        with open(stem + ".safetensors", "wb") as f:
            pickle.dump({"model": torch.zeros(3)}, f)
    else:
        open(stem + ".json", "w").write('{"format": "something-else"}')
    backup = str(tmp_path / "backup")
    shutil.copytree(run_dir, backup)
    code, _, err = run(capsys, "sample", "--run", run_dir, "--num", "5",
                       "--out", str(tmp_path / "s.npy"))
    assert code == 2 and os.path.basename(stem) in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "s.npy")
    for name in os.listdir(os.path.join(backup, "checkpoints")):  # nothing was rewritten
        a = open(os.path.join(backup, "checkpoints", name), "rb").read()
        assert a == open(os.path.join(run_dir, "checkpoints", name), "rb").read()
