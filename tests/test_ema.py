"""Several named EMAs: the update formula, every-k updates, warm-up, checkpoints, --weights.

What is averaged (train/ema.py): after optimizer step n (n = 1, 2, ...), when n is a multiple of
k = ema_every, each average e of decay d becomes d_n^k e + (1 - d_n^k) theta_n, theta_n the
weights *after* step n (the weights of the k - 1 steps between are never averaged), with
d_n = d (ema_warmup=false) or min(d, (1 + m) / (10 + m)), m = n - k (warm-up).
"""

import json
import os

import numpy as np
import pytest
import torch
from cli_helpers import run
from safetensors.torch import load_file
from torch import nn

from meanflow.cli import main
from meanflow.errors import MeanFlowError
from meanflow.runs.checkpoint import latest_checkpoint
from meanflow.runs.noise import sample_noise
from meanflow.train import TrainConfig, load_run
from meanflow.train.ema import EMA


def two_params(w=1.0, b=2.0):
    """A 2-parameter model: y = w x + b, in float64."""
    model = nn.Linear(1, 1).double()
    set_weights(model, w, b)
    return model


def set_weights(model, w, b):
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)


def values(model):
    return [model.weight.item(), model.bias.item()]


def test_constant_decay_is_the_formula():
    """warm-up off: e_{n+1} = d e_n + (1 - d) theta_{n+1}, exactly d from the first step."""
    model = two_params(1.0, 2.0)
    ema = EMA(model, 0.9, warmup=False)
    assert ema.current_decay() == 0.9
    set_weights(model, 3.0, -2.0)
    ema.update(model)
    assert values(ema.model) == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2], abs=1e-14)
    set_weights(model, 0.0, 0.0)
    ema.update(model)
    assert values(ema.model) == pytest.approx([1.08, 1.44], abs=1e-14)
    assert ema.updates == 2


def test_warmup_on_keeps_the_old_rule():
    """warm-up on, k = 1: d_n = min(d, (1 + n) / (10 + n)), n the updates before (0.1 first)."""
    model = two_params(1.0, 2.0)
    ema = EMA(model, 0.5)
    assert ema.current_decay() == pytest.approx(0.1)
    set_weights(model, 11.0, 2.0)
    ema.update(model)  # d = 1/10
    assert values(ema.model) == pytest.approx([0.1 * 1 + 0.9 * 11, 2.0], abs=1e-13)
    set_weights(model, 0.0, 0.0)
    ema.update(model)  # d = min(0.5, 2/11)
    assert values(ema.model) == pytest.approx([(2 / 11) * 10.0, (2 / 11) * 2.0], abs=1e-13)
    # long after the warm-up, the decay is d itself
    ema.updates = 1000
    assert ema.current_decay() == 0.5


def test_every_k_steps_applies_d_to_the_k_to_the_current_weights():
    model = two_params(1.0, 2.0)
    ema = EMA(model, 0.5, every=3, warmup=False)
    assert ema.current_decay() == 0.125
    for w in (10.0, 20.0):  # steps 1 and 2: not averaged, not even partly
        set_weights(model, w, w)
        ema.update(model)
        assert values(ema.model) == [1.0, 2.0]
    set_weights(model, 4.0, 0.0)
    ema.update(model)  # step 3: e = 0.5^3 e + (1 - 0.5^3) theta_3
    assert values(ema.model) == [0.125 * 1 + 0.875 * 4, 0.125 * 2 + 0.875 * 0]  # 3.625, 0.25
    for w in (7.0, 9.0):
        set_weights(model, w, w)
        ema.update(model)
    set_weights(model, 0.0, 0.0)
    ema.update(model)  # step 6
    assert values(ema.model) == [0.453125, 0.03125]
    assert ema.updates == 6


def test_every_k_with_warmup_uses_the_decay_at_the_window_start():
    model = two_params(0.0, 0.0)
    ema = EMA(model, 0.99, every=2)
    set_weights(model, 1.0, 1.0)
    ema.update(model)
    ema.update(model)  # n = 2, m = 0: d = 0.1, d^2 = 0.01
    assert values(ema.model) == pytest.approx([0.99, 0.99], abs=1e-14)
    set_weights(model, 0.0, 0.0)
    ema.update(model)
    ema.update(model)  # n = 4, m = 2: d = 3/12, d^2 = 1/16
    assert values(ema.model) == pytest.approx([0.99 / 16] * 2, abs=1e-14)


def test_several_emas_update_independently():
    model = two_params(1.0, 2.0)
    ema = EMA(model, 0.9, extra=(0.5, 0.0), warmup=False)
    assert list(ema.models) == ["ema", "ema-0.5", "ema-0.0"]
    assert ema.decays == {"ema": 0.9, "ema-0.5": 0.5, "ema-0.0": 0.0}
    set_weights(model, 3.0, -2.0)
    ema.update(model)
    assert values(ema.models["ema"]) == pytest.approx([1.2, 1.6], abs=1e-14)
    assert values(ema.models["ema-0.5"]) == [2.0, 0.0]
    assert values(ema.models["ema-0.0"]) == [3.0, -2.0]  # decay 0: the current weights
    # separate tensors: changing one copy leaves the others and the model alone
    with torch.no_grad():
        ema.models["ema-0.5"].weight.fill_(100.0)
    assert values(ema.models["ema"])[0] == pytest.approx(1.2) and model.weight.item() == 3.0
    tensors = ema.tensors()
    assert {"ema.weight", "ema.bias", "ema-0.5.weight", "ema-0.0.bias"} <= set(tensors)
    # round trip through checkpoint tensors and metadata
    other = EMA(two_params(), 0.9, extra=(0.5, 0.0), warmup=False)
    other.load(tensors, ema.state())
    assert other.updates == 1 and values(other.models["ema-0.5"]) == [100.0, 0.0]
    assert ema.state() == {"ema_updates": 1, "emas": {"ema": 0.9, "ema-0.5": 0.5, "ema-0.0": 0.0}}


@pytest.mark.parametrize("key, value, words", [
    ("ema_extra", "0.99995,1.0", "ema_extra"), ("ema_extra", "0.5,x", "'x'"),
    ("ema_extra", "0.5,0.5", "repeats"), ("ema_extra", "0.999", "repeats"),
    ("ema_every", 0, "ema_every")])
def test_bad_ema_settings_are_refused_in_one_line(key, value, words):
    cfg = TrainConfig(ema_decay=0.999)
    setattr(cfg, key, value)
    with pytest.raises(MeanFlowError, match=words) as info:
        cfg.validate()
    assert "\n" not in str(info.value)


TINY = ["--data", "eight-gaussians", "--preset", "tiny", "--batch-size", "64",
        "--set", "ckpt_every=5", "--set", "log_every=1", "--set", "ema_decay=0.9",
        "--set", "ema_extra=0.5,0.99", "--set", "ema_every=2", "--set", "ema_warmup=false",
        "--quiet"]


def ckpt_tensors(run_dir):
    return load_file(latest_checkpoint(run_dir) + ".safetensors")


@pytest.fixture(scope="module")
def extras_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ema") / "run")
    assert main(["train", "--out", out, "--steps", "10", *TINY]) == 0
    return out


def test_checkpoint_holds_every_ema_and_names_them(extras_run):
    tensors = ckpt_tensors(extras_run)
    meta = json.load(open(latest_checkpoint(extras_run) + ".json"))
    assert meta["emas"] == {"ema": 0.9, "ema-0.5": 0.5, "ema-0.99": 0.99}
    assert meta["ema_updates"] == 10
    names = ("model", "ema", "ema-0.5", "ema-0.99")
    groups = {n: {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
              for n in names}
    assert all(groups[n].keys() == groups["model"].keys() and groups[n] for n in names)
    flat = {n: torch.cat([v.flatten().double() for _, v in sorted(groups[n].items())])
            for n in names}
    assert all(not torch.equal(flat[a], flat[b]) for a in names for b in names if a < b)
    for name in ("ema-0.5", "ema-0.99"):  # load_run gives each copy, by name or decay
        for spelling in (name, name.removeprefix("ema-")):
            loaded = load_run(extras_run, spelling)
            assert loaded.weights == name
            state = loaded.model.state_dict()
            assert all(torch.equal(state[k], groups[name][k]) for k in state)
    assert load_run(extras_run, "0.9").weights == "ema"


def test_resume_with_extras_is_bitwise_identical(extras_run, tmp_path, capsys):
    """Stopped at step 5 (mid-window of ema_every=2) and resumed: every tensor equal."""
    out = str(tmp_path / "run")
    assert run(capsys, "train", "--out", out, "--steps", "5", *TINY)[0] == 0
    code, _, err = run(capsys, "train", "--out", out, "--steps", "10", "--resume", "--quiet")
    assert code == 0, err
    a, b = ckpt_tensors(out), ckpt_tensors(extras_run)
    keep = ("model.", "ema.", "ema-0.5.", "ema-0.99.", "optim.")
    a = {k: v for k, v in a.items() if k.startswith(keep)}
    b = {k: v for k, v in b.items() if k.startswith(keep)}
    assert a.keys() == b.keys() and any(k.startswith("ema-0.99.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_weights_uses_that_copy(extras_run, tmp_path, capsys):
    paths = {}
    for weights in (None, "0.99", "ema-0.99", "raw"):
        path = str(tmp_path / f"{weights}.npy")
        argv = ["sample", "--run", extras_run, "--num", "100", "--out", path]
        code, out, err = run(capsys, *argv, *(["--weights", weights] if weights else []))
        assert code == 0, err
        assert json.loads(out)["weights"] == {None: "ema", "0.99": "ema-0.99"}.get(weights,
                                                                                  weights)
        paths[weights] = np.load(path)
    assert np.array_equal(paths["0.99"], paths["ema-0.99"])
    assert not np.allclose(paths["0.99"], paths[None])
    assert not np.allclose(paths["0.99"], paths["raw"])
    loaded = load_run(extras_run, "ema-0.99")  # one step: e - u(e, 0, 1) of that copy
    e = sample_noise((2,), seed=0, start=0, stop=100)
    with torch.no_grad():
        x = e - loaded.model(e, torch.zeros(100), torch.ones(100))
    assert np.allclose(paths["0.99"], loaded.normalizer.decode(x).numpy(), atol=1e-5)
    code, _, err = run(capsys, *argv[:-1], str(tmp_path / "r.npy"), "--raw")
    assert code == 0 and np.array_equal(np.load(str(tmp_path / "r.npy")), paths["raw"])


def test_unknown_weights_are_refused_in_one_line(extras_run, tmp_path, capsys):
    out = str(tmp_path / "s.npy")
    for command in (["sample", "--out", out], ["eval", "--reference", "eight-gaussians"]):
        code, _, err = run(capsys, command[0], "--run", extras_run, "--num", "10",
                           *command[1:], "--weights", "0.123")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "0.123" in err and "ema-0.5" in err and "ema-0.99" in err and "raw" in err
    code, _, err = run(capsys, "sample", "--run", extras_run, "--num", "10", "--out", out,
                       "--raw", "--weights", "0.5")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_checkpoint_without_names_still_loads(extras_run, tmp_path):
    """A checkpoint written before named EMAs (no "emas", no ema_extra) loads its primary."""
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(extras_run, old)
    stem = latest_checkpoint(old)
    meta = json.load(open(stem + ".json"))
    del meta["emas"]
    for key in ("ema_extra", "ema_every", "ema_warmup"):
        del meta["config"][key]
    json.dump(meta, open(stem + ".json", "w"))
    assert load_run(old).weights == "ema"
    with pytest.raises(MeanFlowError, match="choose one of raw, ema"):
        load_run(old, "0.5")
