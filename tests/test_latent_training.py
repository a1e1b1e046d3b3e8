"""Training on VAE latents end to end: images -> `meanflow latents encode` -> `meanflow train`
(streamed shards, a fresh posterior sample z = (mean + std * eps) * scale every step) ->
`meanflow sample` (decoded by the VAE to uint8 images) -> `meanflow eval` (decoded before the
features). Also: the streamed path equals the in-memory one, with and without worker
processes, and resumes exactly. A tiny random AutoencoderKL stands in for the SD-VAE."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from cli_helpers import run

pytest.importorskip("diffusers")
pytest.importorskip("PIL.Image")

from test_fid import fake_fidelity, weights  # noqa: E402,F401
from test_latents import SIZE, encode_args, image_dir, vae, vae_dir  # noqa: E402,F401

from meanflow.runs.checkpoint import load_latest_good  # noqa: E402

TRAIN = ["--preset", "unet-small", "--set", "model.arch=dit", "--set", "model.size=T/2",
         "--batch-size", "8", "--set", "log_every=2", "--set", "ckpt_every=3",
         "--set", "grid_every=0", "--set", "grid_num=6", "--quiet"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory, image_dir, vae_dir):  # noqa: F811
    out = str(tmp_path_factory.mktemp("lat") / "latents")
    from meanflow.cli import main
    assert main(list(encode_args(image_dir, vae_dir, out))) == 0
    return out


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, latents):
    out = str(tmp_path_factory.mktemp("runs") / "latent-run")
    from meanflow.cli import main
    assert main(["train", "--data", latents, "--out", out, "--steps", "6", *TRAIN]) == 0
    return out


def _weights(run_dir):
    _, tensors, meta = load_latest_good(run_dir)
    return tensors, meta


def _train(capsys, *args):
    code, _, err = run(capsys, "train", *args)
    assert code == 0, err


def _assert_same_state(first, second, step):
    """Both runs stopped at ``step`` and hold bit-identical weights, EMA weights and optimizer
    state; the compared keys are exactly one ``model.`` and one ``ema.`` entry for every entry
    of the network's state_dict (so nothing passes by comparing nothing)."""
    from meanflow.train import load_run

    a, meta_a = _weights(first)
    b, meta_b = _weights(second)
    assert meta_a["step"] == meta_b["step"] == step
    names = set(load_run(first).model.state_dict())
    assert len(names) > 0
    expected = {f"{prefix}.{name}" for prefix in ("model", "ema") for name in names}
    assert {k for k in a if k.startswith(("model.", "ema."))} == expected
    assert a.keys() == b.keys()
    optim = {k for k in a if k.startswith("optim.")}
    assert len(optim) > 0
    for key in sorted(expected | optim):
        assert torch.equal(a[key], b[key]), key


def test_latent_run_records_the_vae_and_streams(latent_run, latents, vae_dir):  # noqa: F811
    tensors, meta = _weights(latent_run)
    assert meta["step"] == 6 and meta["shape"] == [4, SIZE // 2, SIZE // 2]
    assert meta["latents"]["scaling_factor"] == pytest.approx(0.18215)
    assert os.path.samefile(meta["latents"]["vae"], vae_dir)
    # no per-channel standardisation of latents: the scale is the VAE's factor alone
    assert torch.equal(tensors["data.mean"], torch.zeros_like(tensors["data.mean"]))
    assert torch.equal(tensors["data.std"], torch.ones_like(tensors["data.std"]))
    from PIL import Image
    with Image.open(os.path.join(latent_run, "samples-1step.png")) as image:
        assert image.mode == "RGB"


def test_sample_decodes_to_uint8_images(latent_run, vae, tmp_path, capsys):  # noqa: F811
    from meanflow.data.vae import decode
    from meanflow.plotting import to_uint8
    from meanflow.train import load_run

    out = str(tmp_path / "s.npz")
    code, _, err = run(capsys, "sample", "--run", latent_run, "--num", "6", "--out", out,
                       "--class", "0,1,2")
    assert code == 0, err
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (6, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    trained = load_run(latent_run)
    z = trained.sample(6, labels=torch.tensor(labels), decode=False)
    assert z.shape == (6, 4, SIZE // 2, SIZE // 2)
    expected = to_uint8(decode(vae, torch.from_numpy(z), 0.18215).numpy())
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_eval_decodes_before_the_features(latent_run, image_dir, fake_fidelity,  # noqa: F811
                                          weights, capsys):  # noqa: F811
    from meanflow.data.encode import cropped_images
    from meanflow.eval.frechet import fd_from_features
    from meanflow.eval.inception import load_inception
    from meanflow.train import load_run

    code, out, err = run(capsys, "eval", "--run", latent_run, "--reference", image_dir,
                         "--num", "12", "--metric", "fid", "--inception-weights", weights,
                         "--cache-dir", "none", "--quiet", "--class", "0,1,2")
    assert code == 0, err
    result = json.loads(out)
    net, _ = load_inception(weights)
    samples = load_run(latent_run).sample(12, labels=torch.arange(12) % 3)
    assert samples.shape == (12, 3, SIZE, SIZE)  # decoded images, not latents
    ref = cropped_images(image_dir, SIZE, 1000)
    expected = fd_from_features(net.features(ref).numpy(),
                                net.features(torch.from_numpy(samples)).numpy())
    assert result["fid"] == pytest.approx(expected, rel=1e-5)


def test_streamed_resume_and_workers_are_exact(latents, tmp_path, capsys):
    whole = str(tmp_path / "whole")
    _train(capsys, "--data", latents, "--out", whole, "--steps", "6", *TRAIN,
           "--set", "workers=0")
    parts = str(tmp_path / "parts")
    _train(capsys, "--data", latents, "--out", parts, "--steps", "3", *TRAIN,
           "--set", "workers=1")
    _, meta = _weights(parts)
    assert meta["step"] == 3
    _train(capsys, "--data", latents, "--out", parts, "--steps", "6", *TRAIN,
           "--set", "workers=1")
    _assert_same_state(whole, parts, step=6)


def test_streaming_an_in_memory_set_changes_nothing(tmp_path, capsys):
    args = ["--data", "eight-gaussians", "--preset", "tiny", "--steps", "12", "--quiet",
            "--set", "ckpt_every=6"]
    _train(capsys, *args, "--out", str(tmp_path / "memory"))
    _train(capsys, *args, "--out", str(tmp_path / "stream"), "--set", "stream=true",
           "--set", "workers=1")
    _assert_same_state(str(tmp_path / "memory"), str(tmp_path / "stream"), step=12)


def test_unconditional_training_on_labelled_latents(latents, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", latents, "--out", str(tmp_path / "u"),
                       "--steps", "2", *TRAIN, "--unconditional")
    assert code == 0, err
    _, meta = _weights(str(tmp_path / "u"))
    assert meta["config"]["num_classes"] == 0 and meta["class_names"] is None


def test_pipeline_and_export_decode_a_latent_run(latent_run, tmp_path):
    """MeanFlowPipeline loads the run's VAE and returns its decoded samples; an exported latent
    model keeps its VAE facts and decodes the same images."""
    if not hasattr(pytest.importorskip("diffusers"), "FlowMapEulerDiscreteScheduler"):
        pytest.skip("this diffusers has no FlowMapEulerDiscreteScheduler")
    from conftest import perturbed

    import meanflow
    from meanflow.runs.pipeline import MeanFlowPipeline
    from meanflow.runs.noise import sample_noise
    from meanflow.train import load_run

    run = load_run(latent_run)
    torch.manual_seed(0)
    perturbed(run.model)
    assert run.decoder is not None and run.sample_shape == (3, SIZE, SIZE)
    labels = [0, 2, 1, 1]
    expected = run.sample(4, steps=2, seed=3, classes=labels)  # decoded, [-1, 1]
    pipe = MeanFlowPipeline.from_run(run)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is not None
    images = pipe(batch_size=4, num_inference_steps=2, class_labels=labels, output_type="pt",
                  latents=sample_noise(run.shape, 3, 0, 4)).images
    assert images.shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(images, ((torch.from_numpy(expected) + 1) / 2).clamp(0, 1),
                               rtol=0, atol=1e-5)
    back = meanflow.from_pretrained(run.save_pretrained(str(tmp_path / "exported")))
    assert back.latents == run.latents and back.decoder is not None
    np.testing.assert_array_equal(back.sample(4, steps=2, seed=3, classes=labels), expected)


def test_latent_flips_only_with_hflip(latents, image_dir, vae_dir, tmp_path, capsys,  # noqa: F811
                                      monkeypatch):
    """The MeanFlow authors train on the stored latent alone (their LatentDataset returns
    ``data['image']`` and never flips, although it is built with ``use_flip=True``): a set
    encoded with mirrors trains on the unmirrored rows unless ``hflip`` asks for them."""
    import meanflow.train.step as step  # the training step draws the latents

    seen = []
    draw = step.draw_latents

    def spy(moments, generator, *args):
        seen.append((moments.shape[1], args[2]))  # F, flip
        return draw(moments, generator, *args)

    monkeypatch.setattr(step, "draw_latents", spy)
    code, _, err = run(capsys, "train", "--data", latents, "--out", str(tmp_path / "plain"),
                       "--steps", "2", *TRAIN)
    assert code == 0, err
    assert seen and all(entry == (2, False) for entry in seen)
    seen.clear()
    code, _, err = run(capsys, "train", "--data", latents, "--out", str(tmp_path / "flip"),
                       "--steps", "2", *TRAIN, "--set", "hflip=true")
    assert code == 0, err
    assert seen and all(entry == (2, True) for entry in seen)
    # hflip on latents without mirrors is refused in one line
    single = str(tmp_path / "single")
    assert run(capsys, *encode_args(image_dir, vae_dir, single, "--no-flip"))[0] == 0
    code, _, err = run(capsys, "train", "--data", single, "--out", str(tmp_path / "refused"),
                       "--steps", "2", *TRAIN, "--set", "hflip=true")
    assert code == 2 and "latents encode --flip" in err and len(err.strip().splitlines()) == 1
