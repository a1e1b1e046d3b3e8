"""The Python API for trained runs: ``meanflow.load_run(dir).sample(...)``, with ``classes=``."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import meanflow
from meanflow import MeanFlowError
from meanflow.cli import main
from meanflow.runs.run import parse_classes

Image = pytest.importorskip("PIL.Image")

CLASSES = ("Boot", "Sandal", "Sneaker")  # label order is the sorted folder names


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    assert main(["train", "--data", "eight-gaussians", "--preset", "tiny", "--out", out,
                 "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """A 2-step class-conditional run on 8x8 images in one folder per named class."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "data" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(8, 8)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / "data" / name / f"{i}.png")
    out = str(root / "run")
    assert main(["train", "--data", str(root / "data"), "--preset", "unet-small", "--steps", "2",
                 "--batch-size", "4", "--set", "model.channels=8", "--set", "grid_num=3",
                 "--out", out, "--quiet"]) == 0
    return out


def test_load_run_is_public_and_import_stays_light():
    code = ("import sys, meanflow; assert 'meanflow.train' not in sys.modules; "
            "assert meanflow.load_run is meanflow.runs.load.load_run; "
            "assert 'load_run' in dir(meanflow) and 'TrainedRun' in meanflow.__all__")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        meanflow.no_such_name


def test_one_step_sample_is_the_formula_of_the_ema_model(vector_run):
    from meanflow.runs.noise import sample_noise

    run = meanflow.load_run(vector_run)
    assert run.weights == "ema" and run.device == torch.device("cpu")
    assert run.shape == (2,) and run.class_names is None and "step=50" in repr(run)
    points = run.sample(100, steps=1, seed=0)
    assert points.shape == (100, 2) and points.dtype == np.float32
    e = sample_noise((2,), seed=0, start=0, stop=100)  # per-chunk generators (runs/noise.py)
    with torch.no_grad():
        x = e - run.model(e, torch.zeros(100), torch.ones(100))
    assert np.allclose(points, run.normalizer.decode(x).numpy(), atol=1e-5)
    raw = meanflow.load_run(vector_run, weights="raw").sample(100, steps=1, seed=0)
    assert not np.allclose(points, raw)  # the default really is the EMA network
    assert np.array_equal(run.sample(100, steps=2, seed=0, device="cpu"),
                          run.sample(100, schedule=[1.0, 0.5, 0.0], seed=0))
    with pytest.raises(MeanFlowError, match="unconditional"):
        run.sample(4, classes="0")


def test_classes_by_name_equal_the_label_tensor(labelled_run):
    run = meanflow.load_run(labelled_run)
    assert run.class_names == list(CLASSES) and run.num_classes == 3
    sneakers = run.sample(6, seed=1, classes="Sneaker")
    assert sneakers.shape == (6, 1, 8, 8)
    assert np.array_equal(sneakers, run.sample(6, seed=1, labels=torch.full((6,), 2)))
    cycled = run.sample(5, seed=1, labels=torch.tensor([0, 2, 0, 2, 0]))
    for classes in (["Boot", "Sneaker"], "Boot,Sneaker", [0, 2], ("Boot", 2), "0, 2"):
        assert np.array_equal(run.sample(5, seed=1, classes=classes), cycled), classes
    null = run.sample(5, seed=1)
    assert np.array_equal(run.sample(5, seed=1, classes="none"), null)
    assert not np.array_equal(null, cycled)
    randomly = parse_classes("random", 5, run, seed=1)
    assert np.array_equal(run.sample(5, seed=1, classes="random"),
                          run.sample(5, seed=1, labels=randomly))
    # the same labels as `meanflow sample --class Boot,Sneaker`
    assert parse_classes("Boot,Sneaker", 5, run, 0).tolist() == [0, 2, 0, 2, 0]


def test_class_errors(labelled_run, tmp_path, capsys):
    run = meanflow.load_run(labelled_run)
    with pytest.raises(MeanFlowError, match=r"'Sneekers' is not a class.*did you mean 'Sneaker'"):
        run.sample(4, classes="Sneekers")
    with pytest.raises(MeanFlowError, match=r"--class 'Sneekers'.*did you mean 'Sneaker'"):
        parse_classes("Sneekers", 4, run, 0)  # the CLI's message, too
    with pytest.raises(MeanFlowError, match="not both"):
        run.sample(4, classes="Boot", labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(MeanFlowError, match="not a class"):
        run.sample(4, classes=3)
    with pytest.raises(MeanFlowError, match="labels must be integers"):
        run.sample(4, labels=torch.full((4,), 7))
    with pytest.raises(MeanFlowError, match="empty"):
        run.sample(4, classes=[])
    out = str(tmp_path / "never.png")
    assert main(["sample", "--run", labelled_run, "--num", "3", "--class", "Sneekers",
                 "--out", out]) == 2
    assert "did you mean 'Sneaker'" in capsys.readouterr().err
