"""FID plumbing (``--metric fid``): torch-fidelity's Inception is replaced by a locally built
network with the same constructor and call contract, so every step we own (finding and checking
the weights, quantising images, grey to RGB, streaming, the Frechet distance, the floor, the
cache, the JSON) is exercised; no claim is made about FID values."""

import hashlib
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from test_train_images import make_class_folder
from torch import nn

from meanflow import MeanFlowError
from meanflow.cli import main
from meanflow.eval import fd_from_features
from meanflow.eval.inception import WEIGHTS_ENV, WEIGHTS_URL, InceptionFeatures, load_inception
from meanflow.plotting import to_uint8

pytest.importorskip("PIL.Image")


class TinyInception(nn.Module):
    """Stands in for torch_fidelity's FeatureExtractorInceptionV3: same arguments, uint8
    (B, 3, H, W) in, a tuple of (B, D) features out, weights only from the given file."""

    calls: list = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__()
        assert feature_extractor_weights_path is not None, "would download"
        assert features_list == ["2048"]
        self.conv = nn.Conv2d(3, 6, 3)
        self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))
        TinyInception.calls.append(feature_extractor_weights_path)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        h = torch.tanh(self.conv((x.float() - 128) / 128))
        return (torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1),)


@pytest.fixture
def fake_fidelity(monkeypatch):
    pkg = types.ModuleType("torch_fidelity")
    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = TinyInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    TinyInception.calls = []


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty library cache
    torch.manual_seed(0)
    path = str(tmp_path / "inception.pth")
    torch.save({"conv." + k: v for k, v in nn.Conv2d(3, 6, 3).state_dict().items()}, path)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inception_features_quantise_like_the_uint8_export(fake_fidelity, weights):
    net, meta = load_inception(weights)
    assert TinyInception.calls == [weights]
    assert meta["fingerprint"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()[:16]
    x = torch.rand(4, 1, 9, 9) * 2.2 - 1.1  # also outside [-1, 1]: clipped like the export
    pixels = torch.from_numpy(to_uint8(x.clamp(-1, 1).numpy())).permute(0, 3, 1, 2)
    expected = net.net(pixels.expand(-1, 3, -1, -1).contiguous())[0]
    assert torch.equal(net.features(x), expected)
    rgb = torch.rand(2, 3, 9, 9) * 2 - 1
    assert torch.equal(net.features(rgb), net.net(torch.from_numpy(to_uint8(rgb.numpy()))
                                                  .permute(0, 3, 1, 2).contiguous())[0])
    assert isinstance(net, InceptionFeatures) and net.channels == (1, 3)


def test_weights_come_from_the_flag_the_environment_or_the_library_cache(fake_fidelity, weights,
                                                                        monkeypatch, tmp_path):
    with pytest.raises(MeanFlowError) as info:
        load_inception()
    message = str(info.value)
    assert WEIGHTS_URL in message and "--inception-weights" in message and "\n" not in message
    assert str(tmp_path / "torch-home") in message  # names where it looked
    monkeypatch.setenv(WEIGHTS_ENV, weights)
    assert load_inception()[1]["weights"] == os.path.abspath(weights)
    monkeypatch.delenv(WEIGHTS_ENV)
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(weights, cache / "weights-inception-2015-12-05-6726825d.pth")
    assert load_inception()[1]["weights"].startswith(str(cache))
    with pytest.raises(MeanFlowError, match="does not exist"):
        load_inception(str(tmp_path / "missing.pth"))


def test_bad_weights_files_are_refused_before_the_library_loads_them(fake_fidelity, weights,
                                                                    tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MeanFlowError, match="junk.pth: not a weights file"):
        load_inception(str(junk))
    pickled = tmp_path / "object.pth"
    torch.save({"conv.weight": torch.zeros(1), "note": types.SimpleNamespace(a=1)}, pickled)
    with pytest.raises(MeanFlowError, match="object.pth: not a weights file"):
        load_inception(str(pickled))  # weights_only=True refuses arbitrary objects
    wrong = tmp_path / "wrong.pth"
    torch.save({"other.weight": torch.zeros(1)}, wrong)
    with pytest.raises(MeanFlowError, match="torch-fidelity cannot load"):
        load_inception(str(wrong))
    assert TinyInception.calls == []


def test_a_missing_library_is_one_line(weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(MeanFlowError) as info:
        load_inception(weights)
    assert "pip install 'meanflow[fid]'" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    data = make_class_folder(root / "data", per_class=10)
    out = str(root / "run")
    assert main(["train", "--data", data, "--out", out, "--preset", "unet-small", "--steps",
                 "2", "--batch-size", "8", "--quiet"]) == 0
    return out, data


def test_eval_fid_end_to_end_equals_the_frechet_distance_of_its_features(
        fake_fidelity, weights, grey_run, tmp_path, capsys):
    from meanflow.data import open_data
    from meanflow.train import load_run

    run_dir, data = grey_run
    cache = str(tmp_path / "cache")
    code, out, err = run(capsys, "eval", "--run", run_dir, "--reference", data, "--num", "12",
                         "--metric", "fid,swd", "--inception-weights", weights, "--cache-dir",
                         cache, "--steps", "2", "--seed", "5")
    assert code == 0, err
    result = json.loads(out)
    net, meta = load_inception(weights)
    loaded = load_run(run_dir)
    labels = torch.arange(12) % 2
    samples = torch.from_numpy(loaded.sample(12, steps=2, seed=5, labels=labels))
    ref = open_data(data, size=loaded.config.image_size).x
    expected = fd_from_features(net.features(ref).numpy(), net.features(samples).numpy())
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    floor = fd_from_features(net.features(ref).numpy(), net.features(ref[:12]).numpy())
    assert result["fid_floor"] == pytest.approx(floor, rel=1e-6)
    assert result["inception"]["fingerprint"] == meta["fingerprint"]
    assert result["nfe"] == 2 and result["steps"] == 2 and np.isfinite(result["swd"])
    assert "fd" not in result and "features" not in result
    assert len(os.listdir(cache)) == 2  # reference and floor features, keyed by the weights
    # precision/recall in Inception space too, from the same cache
    code, out, err = run(capsys, "eval", "--run", run_dir, "--reference", data, "--num", "12",
                         "--metric", "fid,pr", "--features", "inception", "--inception-weights",
                         weights, "--cache-dir", cache, "--steps", "2", "--seed", "5")
    assert code == 0, err
    again = json.loads(out)
    assert again["fid"] == result["fid"] and 0 <= again["precision"] <= 1
    assert len(os.listdir(cache)) == 2
    # precomputed statistics of the same reference (the ADM / pytorch-fid .npz layout)
    feats = net.features(ref).double().numpy()
    stats = str(tmp_path / "stats.npz")
    np.savez(stats, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    code, out, err = run(capsys, "eval", "--run", run_dir, "--reference", stats, "--num", "12",
                         "--metric", "fid", "--inception-weights", weights, "--steps", "2",
                         "--seed", "5")
    assert code == 0, err
    from_stats = json.loads(out)
    assert from_stats["fid"] == pytest.approx(result["fid"], rel=1e-6)
    assert from_stats["fid_floor"] is None and from_stats["reference_num"] is None
    code, out, err = run(capsys, "eval", "--run", run_dir, "--reference", stats, "--num", "12",
                         "--metric", "fid,pr", "--inception-weights", weights)
    assert code == 2 and "fid only" in err and out == ""


def test_eval_fid_errors_are_one_line_and_write_nothing(fake_fidelity, weights, grey_run,
                                                        tmp_path, capsys):
    run_dir, data = grey_run
    before = sorted(os.listdir(run_dir))
    cases = [
        (["--metric", "fid"], "never downloaded"),                        # no weights anywhere
        (["--metric", "fid", "--inception-weights", str(tmp_path / "x.pth")], "does not exist"),
        (["--metric", "fd", "--features", "inception"], "never downloaded"),
        (["--metric", "pr", "--features", "inception", "--inception-weights", weights,
          "--num", "3"], "too few samples: pr needs --num > 3"),
        (["--metric", "fid", "--inception-weights", weights, "--num", "1"], "--num must be >= 2"),
    ]
    for extra, pattern in cases:
        code, out, err = run(capsys, "eval", "--run", run_dir, "--reference", data, "--cache-dir",
                             str(tmp_path / "c"), *(["--num", "8"] if "--num" not in extra
                                                    else []), *extra)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (extra, err)
        assert __import__("re").search(pattern, err), (extra, err)
    assert sorted(os.listdir(run_dir)) == before


def test_fid_refuses_latent_runs(fake_fidelity, weights, tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(16, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "latents.npz", x=x)
    run_dir = str(tmp_path / "run")
    assert main(["train", "--data", str(tmp_path / "latents.npz"), "--out", run_dir, "--preset",
                 "unet-small", "--steps", "1", "--batch-size", "8", "--quiet"]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "eval", "--run", run_dir, "--reference", str(tmp_path /
                       "latents.npz"), "--num", "8", "--metric", "fid", "--inception-weights",
                       weights)
    assert code == 2 and "VAE" in err and len(err.strip().splitlines()) == 1


def test_the_real_library_if_installed_builds_from_local_weights(tmp_path, monkeypatch):
    """Where torch-fidelity imports (not beside torch 2.13's CPU build here: its torchvision
    does not load), its real Inception-v3 with random weights goes through the same path."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                   exc_type=ImportError)
    cls = fidelity.FeatureExtractorInceptionV3
    with monkeypatch.context() as patch:  # random weights in the real layout, no download
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(cls, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        state = cls("inception-v3-compat", ["2048"]).state_dict()
    path = str(tmp_path / "random-inception.pth")
    torch.save(state, path)
    features, meta = load_inception(path)
    out = features.features(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert out.shape == (2, 2048) and meta["library"].startswith("torch-fidelity")
