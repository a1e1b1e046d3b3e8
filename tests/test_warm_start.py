"""``meanflow train --init RUN``: a new run starts from another run's EMA weights (e.g. a
flow-matching run fine-tuned into MeanFlow), everything else fresh; a different network is
refused in one line and nothing is written."""

import json
import os
import shutil

import pytest
import torch
from cli_helpers import run

import meanflow
from meanflow.config.build import build_model
from meanflow.config.presets import configure
from meanflow.config.schema import TrainConfig
from meanflow.errors import MeanFlowError
from meanflow.train.warm_start import load_initial_weights

TINY = ("--data", "two-moons", "--preset", "tiny", "--threads", "1", "--quiet")


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    """A finished flow-matching run (the source of the weights)."""
    out = str(tmp_path_factory.mktemp("warm") / "fm")
    meanflow.fit(out, data="two-moons", preset="tiny", steps=30,
                 settings={"objective": "flow-matching"}, progress=False, log=lambda _: None)
    return out


def _weights(run_dir, which="ema"):
    return meanflow.load_run(run_dir, which).model.state_dict()


def test_the_network_starts_from_the_source_ema_weights_and_nothing_else(fm_run):
    cfg = configure(TrainConfig(), "tiny", [("data_shape", "2"), ("seed", 7)])
    model = build_model(cfg, (2,), 0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    note = load_initial_weights(model, fm_run)
    source = _weights(fm_run)
    assert "flow-matching" in note and "step 30" in note and "ema" in note
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key
    # the copy is of the EMA, which differs from the raw weights after 30 steps
    raw = _weights(fm_run, "raw")
    assert any(not torch.equal(source[k], raw[k]) for k in source)
    assert any(not torch.equal(fresh[k], source[k]) for k in source)


def test_a_meanflow_run_from_a_flow_matching_run_trains_from_its_weights(fm_run, tmp_path,
                                                                           capsys):
    out, copy = str(tmp_path / "mf"), str(tmp_path / "fm-copy")
    shutil.copytree(fm_run, copy)
    # a learning rate of 1e-30 moves no float32 weight: after one step the raw weights are
    # still exactly the source's EMA
    code, _, err = run(capsys, "train", *TINY, "--init", copy, "--out", out, "--steps", "1",
                       "--set", "optim.lr=1e-30")
    assert code == 0, err
    assert f"network initialised from {copy!r} (flow-matching, step 30, ema weights)" in err
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert saved["init"] == copy and saved["objective"] == "meanflow" and saved["steps"] == 1
    source, now = _weights(copy), _weights(out, "raw")
    for key in source:
        assert torch.equal(source[key], now[key]), key
    # resuming continues the run's own checkpoint: the source is never read again
    shutil.rmtree(copy)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "2", "--quiet",
                       "--threads", "1")
    assert code == 0, err
    assert "initialised" not in err
    code, _, err = run(capsys, "train", *TINY, "--init", copy, "--out", out, "--steps", "3",
                       "--set", "optim.lr=1e-30")  # the same command again, with more steps
    assert code == 0, err
    assert "initialised" not in err and json.load(open(os.path.join(out, "config.json")))["steps"] == 3


def test_a_different_network_is_refused_in_one_line_and_nothing_is_written(fm_run, tmp_path,
                                                                          capsys):
    out = str(tmp_path / "wider")
    code, _, err = run(capsys, "train", *TINY, "--init", fm_run, "--out", out, "--steps", "1",
                       "--set", "model.hidden=48")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "does not match this run's" in lines[0] and "(48" in lines[0]
    assert not os.path.exists(out)


def test_a_missing_source_is_refused_before_anything_is_written(tmp_path, capsys):
    out = str(tmp_path / "new")
    missing = str(tmp_path / "nowhere")
    code, _, err = run(capsys, "train", *TINY, "--init", missing, "--out", out, "--steps", "1")
    assert code == 2 and "does not exist" in err and missing in err
    assert not os.path.exists(out)
    with pytest.raises(MeanFlowError, match="does not exist"):
        load_initial_weights(torch.nn.Linear(2, 2), missing)
