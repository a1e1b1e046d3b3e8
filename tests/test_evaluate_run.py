"""The evaluation protocol as a library call: ``meanflow.eval.evaluate_run`` returns what
``meanflow eval`` prints, the ablation studies evaluate in-process, and a reference of the
other kind is refused with one line naming both kinds."""

import json
import subprocess

import numpy as np
import pytest
from cli_helpers import run

from meanflow import MeanFlowError
from meanflow.data import TOY_DATASETS
from meanflow.eval import energy_distance, evaluate_run, sliced_wasserstein
from meanflow.runs.load import load_run
from meanflow.train import ablation


def _cli(capsys, *argv) -> dict:
    code, out, err = run(capsys, "eval", *argv, "--quiet")
    assert code == 0, err
    assert len(out.splitlines()) == 1
    return json.loads(out)


def _as_printed(result: dict) -> dict:
    """The library's dict as the command's JSON line reads back."""
    return json.loads(json.dumps(result))


def test_the_library_call_returns_what_meanflow_eval_prints_for_a_vector_run(tiny_run, capsys):
    printed = _cli(capsys, "--run", tiny_run, "--reference", "eight-gaussians", "--num", "300",
                   "--seed", "2", "--schedule", "1,0.4,0", "--raw", "--projections", "64")
    result = evaluate_run(tiny_run, "eight-gaussians", num=300, seed=2, schedule=[1, 0.4, 0],
                          weights="raw", projections=64)
    assert _as_printed(result) == printed
    assert printed["steps"] == 2 and printed["nfe"] == 2 and printed["weights"] == "raw"
    assert printed["schedule"] == [1.0, 0.4, 0.0] and printed["reference_num"] == 300
    # the protocol's definition (docs/evaluation.md): samples seeded by --seed, a built-in
    # reference drawn fresh with seed 10000 + seed, SWD and energy distance between them
    loaded = load_run(tiny_run, "raw")
    samples = loaded.sample(300, seed=2, schedule=[1.0, 0.4, 0.0])
    reference = TOY_DATASETS["eight-gaussians"](300, np.random.default_rng(10_002))
    assert printed["swd"] == sliced_wasserstein(samples, reference, projections=64)
    assert printed["energy_distance"] == energy_distance(samples, reference)
    # a loaded run gives the same numbers as its directory
    assert evaluate_run(loaded, "eight-gaussians", num=300, seed=2, schedule="1,0.4,0",
                        projections=64) == result
    with pytest.raises(MeanFlowError, match="weights, device apply when loading a run"):
        evaluate_run(loaded, "eight-gaussians", weights="raw", device="cpu")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """Two training steps of the small U-Net on scikit-learn's digits (16 x 16, 10 classes)."""
    from meanflow.cli import main

    out = str(tmp_path_factory.mktemp("runs") / "digits")
    assert main(["train", "--data", "digits", "--out", out, "--preset", "unet-small",
                 "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    return out


def test_the_library_call_returns_what_meanflow_eval_prints_for_an_image_run(image_run, capsys,
                                                                            tmp_path):
    cache = str(tmp_path / "cache")
    printed = _cli(capsys, "--run", image_run, "--reference", "digits", "--num", "24",
                   "--metric", "fd,pr,swd", "--class", "3,5", "--steps", "2",
                   "--cache-dir", cache)
    result = evaluate_run(image_run, "digits", num=24, metrics=["fd", "pr", "swd"],
                          classes="3,5", steps=2, cache_dir=None)
    assert _as_printed(result) == printed
    assert printed["classes"] == [3, 5] and printed["reference_num"] == 1797  # sklearn's digits
    assert printed["features"]["name"] == "digits"
    for key in ("fd", "precision", "recall", "density", "coverage", "swd", "energy_distance"):
        assert np.isfinite(printed[key]) and np.isfinite(printed.get(f"{key}_floor", 0.0)), key
    # the floor compares training images with the reference: here the same set, so every
    # training image lies inside its own k-NN ball (precision 1) and the FD is small
    assert printed["precision_floor"] == 1.0 and printed["fd_floor"] < printed["fd"]


def test_an_image_run_refuses_a_vector_reference_naming_both_kinds(image_run, capsys, tmp_path):
    code, out, err = run(capsys, "eval", "--run", image_run, "--reference", "two-moons",
                         "--num", "10", "--quiet")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("meanflow: error: reference 'two-moons' is vectors (a built-in 2-D "
                          "distribution) but the run generates images (1x16x16); ")
    np.save(tmp_path / "points.npy", np.zeros((20, 2)))
    with pytest.raises(MeanFlowError, match=r"points.npy' holds vectors but the run generates "
                                            r"images \(1x16x16\)"):
        evaluate_run(image_run, str(tmp_path / "points.npy"), num=10)
    with pytest.raises(MeanFlowError, match="is a run directory, not reference data .*'digits'"):
        evaluate_run(image_run, image_run, num=10)


def test_ablation_evaluates_in_process_with_the_cli_numbers(tiny_run, capsys, monkeypatch):
    expected = _cli(capsys, "--run", tiny_run, "--reference", "eight-gaussians", "--num", "200",
                    "--steps", "2", "--device", "cpu")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert _as_printed(ablation.evaluate(tiny_run, "eight-gaussians", 2, 200, "cpu")) == expected
    with pytest.raises(MeanFlowError, match=f"evaluating {tiny_run}: reference 'digits' is "
                                            "images but the run generates vectors"):
        ablation.evaluate(tiny_run, "digits", 1, 200, "cpu")
