"""Feature networks and the image evaluation protocol (FD, precision/recall, floor, cache)."""

import json
import os

import numpy as np
import pytest
import torch
from test_train_images import make_class_folder

from meanflow import MeanFlowError
from meanflow.cli import main
from meanflow.eval.features import (
    FeatureNet,
    _shift,
    extract,
    fingerprint,
    load_feature_net,
    save_feature_net,
)

pytest.importorskip("PIL.Image")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shift_translates_and_pads_with_background():
    x = torch.arange(32, dtype=torch.float).reshape(2, 1, 4, 4)
    y = _shift(x, torch.Generator().manual_seed(0), max_shift=1)
    for i in range(2):  # every output is the input moved by (dy, dx) in {-1, 0, 1}^2
        found = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1), value=-1.0)
                if torch.equal(padded[:, 1 + dy:5 + dy, 1 + dx:5 + dx], y[i]):
                    found = True
        assert found


def test_feature_net_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = FeatureNet(1, 3).eval()
    meta = save_feature_net(model, str(tmp_path / "f.safetensors"), {"test_accuracy": 0.5})
    loaded, meta2 = load_feature_net(str(tmp_path / "f.safetensors"))
    x = torch.rand(5, 1, 12, 12) * 2 - 1
    assert torch.equal(extract(model, x), extract(loaded, x))
    assert extract(model, x).shape == (5, 128)
    assert meta["fingerprint"] == meta2["fingerprint"] == fingerprint(loaded)
    with pytest.raises(MeanFlowError, match="meanflow features train"):
        load_feature_net("no-such-net")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(MeanFlowError, match="bad.safetensors"):
        load_feature_net(str(tmp_path / "bad.safetensors"))


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    data = make_class_folder(root / "data", per_class=20)
    out = str(root / "net.safetensors")
    assert main(["features", "train", "--data", data, "--out", out, "--epochs", "3",
                 "--quiet"]) == 0
    return out, data


def test_features_train_learns_an_easy_task(feature_file):
    out, _ = feature_file
    meta = json.load(open(out[:-len(".safetensors")] + ".json"))
    assert meta["test_accuracy"] >= 0.9 and meta["test_num"] == 8  # blobs vs frames
    assert meta["classes"] == ["circle", "square"] and meta["image_shape"] == [1, 8, 8]


def test_eval_reports_fd_pr_floor_and_caches_the_reference(feature_file, tmp_path, capsys):
    out, data = feature_file
    run_dir = str(tmp_path / "run")
    assert run(capsys, "train", "--data", data, "--out", run_dir, "--preset", "unet-small",
               "--steps", "2", "--batch-size", "8", "--quiet")[0] == 0
    cache = str(tmp_path / "cache")
    argv = ["eval", "--run", run_dir, "--reference", data, "--num", "20", "--features", out,
            "--cache-dir", cache, "--metric", "fd,pr,swd"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert len(stdout.splitlines()) == 1  # progress bars go to stderr
    for bar in ("sampling + features", "reference features", "training features (floor)"):
        assert bar in err, bar
    result = json.loads(stdout)
    for key in ("fd", "fd_floor", "precision", "recall", "density", "coverage",
                "precision_floor", "swd", "energy_distance"):
        assert np.isfinite(result[key]), key
    # the floor's images are reference images themselves, so each lies inside its own ball
    assert result["precision_floor"] == 1.0 and result["coverage_floor"] > 0
    assert result["features"]["fingerprint"] == json.load(open(out[:-12] + ".json"))["fingerprint"]
    entries = sorted(os.listdir(cache))
    assert len(entries) == 2  # reference and training-split features
    stamps = [os.path.getmtime(os.path.join(cache, e)) for e in entries]
    code, stdout2, err2 = run(capsys, *argv, "--quiet")
    assert code == 0 and json.loads(stdout2)["fd"] == result["fd"] and err2 == ""
    assert [os.path.getmtime(os.path.join(cache, e)) for e in entries] == stamps


def test_eval_without_a_feature_network_is_one_clear_line(feature_file, tmp_path, capsys):
    _, data = feature_file
    run_dir = str(tmp_path / "run")
    assert run(capsys, "train", "--data", data, "--out", run_dir, "--preset", "unet-small",
               "--steps", "1", "--batch-size", "8", "--quiet")[0] == 0
    code, _, err = run(capsys, "eval", "--run", run_dir, "--reference", data, "--num", "4")
    assert code == 2 and "meanflow features train" in err and len(err.strip().splitlines()) == 1


def test_streamed_samples_and_features_equal_the_whole(feature_file, tmp_path, capsys):
    """Sampling in batches for the features gives the very samples of one ``sample`` call."""
    from meanflow.eval.protocol import sample_features
    from meanflow.train import load_run

    out, data = feature_file
    run_dir = str(tmp_path / "run")
    assert run(capsys, "train", "--data", data, "--out", run_dir, "--preset", "unet-small",
               "--steps", "1", "--batch-size", "8", "--quiet")[0] == 0
    loaded = load_run(run_dir)
    net, _ = load_feature_net(out)
    labels = torch.arange(10) % 2
    whole = loaded.sample(10, seed=3, labels=labels, batch=4)
    chunks = list(loaded.iter_samples(10, seed=3, labels=labels, batch=4))
    assert [len(c) for c in chunks] == [4, 4, 2] and np.array_equal(torch.cat(chunks).numpy(), whole)
    feats, images = sample_features(loaded, {"fd": net}, 10, keep_images=True, progress=False, seed=3,
                                    labels=labels, batch=4)
    assert np.array_equal(images, whole)
    assert np.allclose(feats["fd"], extract(net, torch.from_numpy(whole)).numpy(), atol=1e-5)
