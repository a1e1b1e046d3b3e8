"""Save and load like the Hub: ``meanflow export`` / ``TrainedRun.save_pretrained`` write
config.json + model.safetensors; ``meanflow.from_pretrained`` reads them back to the same
network, bit for bit, and the same samples."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import perturbed

import meanflow
from meanflow.cli import main
from meanflow.errors import MeanFlowError
from meanflow.train import load_run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 3-step class-conditional U-Net run on 16x16 digits."""
    out = str(tmp_path_factory.mktemp("runs") / "digits")
    assert main(["train", "--data", "digits", "--out", out, "--preset", "digits-small",
                 "--steps", "3", "--batch-size", "8", "--set", "model.channels=8", "--set",
                 "grid_every=0", "--quiet", "--threads", "1"]) == 0
    return out


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_export_command_round_trip_is_bitwise(digits_run, tmp_path, capsys):
    out = str(tmp_path / "exported")
    capsys.readouterr()
    assert main(["export", "--run", digits_run, "--out", out, "--threads", "1"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["step"] == 3 and info["weights"] == "ema"
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlibrary_name: meanflow\n") and f'from_pretrained("{out}")' in card
    assert "3 steps" in card and "10 classes" in card
    run, back = load_run(digits_run), meanflow.from_pretrained(out)
    assert info["parameters"] == sum(p.numel() for p in run.model.parameters())
    _same_state(run.model, back.model)
    assert back.class_names == run.class_names and len(back.class_names) == 10
    assert back.shape == run.shape == (1, 16, 16) and back.step == 3
    assert torch.equal(back.normalizer.mean, run.normalizer.mean)
    assert back.config.to_dict() == run.config.to_dict()
    for steps in (1, 2):
        kwargs = dict(steps=steps, seed=3, classes=["3", "7"])
        assert np.array_equal(run.sample(6, **kwargs), back.sample(6, **kwargs))
    # the sample command reads an exported folder as it reads a run
    png = str(tmp_path / "grid.png")
    assert main(["sample", "--run", out, "--num", "10", "--out", png, "--quiet",
                 "--threads", "1"]) == 0
    from PIL import Image

    with Image.open(png) as image:  # 10 samples of 16 x 16 in one grid, not an empty file
        assert image.width >= 16 and image.height >= 16 and np.asarray(image).std() > 0


def test_save_pretrained_of_trained_weights_and_raw(digits_run, tmp_path):
    """A network whose every parameter is non-trivial survives the round trip exactly, and
    ``weights="raw"`` exports the raw weights."""
    run = load_run(digits_run)
    perturbed(run.model)
    folder = run.save_pretrained(str(tmp_path / "p"))
    back = meanflow.from_pretrained(folder)
    _same_state(run.model, back.model)
    kwargs = dict(steps=2, seed=0, classes="random")
    assert np.array_equal(run.sample(5, **kwargs), back.sample(5, **kwargs))
    raw = load_run(digits_run, weights="raw")
    raw_back = meanflow.from_pretrained(raw.save_pretrained(str(tmp_path / "raw")))
    assert raw_back.weights == "raw"
    _same_state(raw.model, raw_back.model)


def test_vector_run_keeps_its_normalizer(tiny_run, tmp_path):
    run = load_run(tiny_run)
    assert not torch.equal(run.normalizer.std, torch.ones_like(run.normalizer.std))
    back = meanflow.from_pretrained(run.save_pretrained(str(tmp_path / "v")))
    assert torch.equal(back.normalizer.std, run.normalizer.std)
    assert np.array_equal(run.sample(300, steps=1, seed=5), back.sample(300, steps=1, seed=5))


def test_export_never_overwrites_what_it_did_not_write(digits_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--run", digits_run, "--out", str(out), "--threads", "1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", "--run", digits_run, "--out", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["export", "--run", digits_run, "--out", str(out), "--overwrite",
                 "--threads", "1"]) == 0
    # a training run (or any folder with other files) is never replaced, even with --overwrite
    listing = sorted(os.listdir(digits_run))
    assert main(["export", "--run", digits_run, "--out", digits_run, "--overwrite",
                 "--threads", "1"]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert sorted(os.listdir(digits_run)) == listing


def test_from_pretrained_errors_are_one_clear_line(tmp_path):
    with pytest.raises(MeanFlowError, match="neither a local folder nor a Hub model"):
        meanflow.from_pretrained(str(tmp_path / "missing"), local_files_only=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2D"}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(MeanFlowError, match="is not a meanflow model's"):
        meanflow.from_pretrained(str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeanFlowError, match="holds no exported model"):
        meanflow.from_pretrained(str(tmp_path / "empty"))


def test_exported_weights_that_do_not_fit_are_refused(digits_run, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = load_run(digits_run).save_pretrained(str(tmp_path / "m"))
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state.pop(sorted(state)[0])
    save_file(state, path)
    with pytest.raises(MeanFlowError, match="does not match the network of its config"):
        meanflow.from_pretrained(folder)
