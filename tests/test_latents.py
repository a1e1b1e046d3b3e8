"""VAE latents: ADM's centre crop, ``meanflow latents encode`` (shards equal the VAE's
posterior of each crop and its flip, labels, resume, refusals), :class:`LatentShards`, the
training-time posterior sample :func:`draw_latents`, and decode. A tiny randomly initialised
AutoencoderKL stands in for the SD-VAE (nothing is downloaded)."""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
from cli_helpers import run

from meanflow.errors import MeanFlowError

pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from meanflow.data.latents import LatentShards, draw_latents, is_latents_dir  # noqa: E402
from meanflow.data.vae import adm_center_crop, decode, encode, find_vae_dir, load_vae  # noqa: E402

BICUBIC, BOX = Image.Resampling.BICUBIC, Image.Resampling.BOX
SIZE = 16  # crop size; the tiny VAE downsamples by 2 -> latents (4, 8, 8)
# (width, height) of the test images: larger than 2*SIZE (halving), between, and smaller
SIZES = [(40, 36), (64, 48), (36, 40), (48, 64), (20, 30), (17, 16), (30, 12), (70, 33)]
CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16)
    path = str(tmp_path_factory.mktemp("vae") / "tiny-vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir, "cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """24 images in 3 class folders, of varied sizes and modes (RGB, L, RGBA; one JPEG)."""
    root = tmp_path_factory.mktemp("images") / "pets"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i, (w, h) in enumerate(SIZES):
            # smooth-ish content so bicubic resizing matters
            base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((w, h), BICUBIC)
            if i == 3:
                image = image.convert("L")
            elif i == 5:
                image = image.convert("RGBA")
            image.save(root / name / f"{i:02d}.{'jpg' if (c, i) == (1, 2) else 'png'}")
    return str(root)


def encode_args(data, vae_dir, out, *extra):
    """An encode with mirror images (``--flip``), so that both rows of F can be checked."""
    return ("latents", "encode", "--data", data, "--vae", vae_dir, "--out", out,
            "--image-size", str(SIZE), "--shard-size", "8", "--batch-size", "5", "--quiet",
            "--flip", *extra)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, image_dir, vae_dir) -> tuple[str, dict]:
    """An uninterrupted encode of ``image_dir`` (3 shards of 8) and its printed JSON line."""
    from meanflow.cli import main

    out = str(tmp_path_factory.mktemp("latents") / "pets")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(list(encode_args(image_dir, vae_dir, out))) == 0
    return out, json.loads(buffer.getvalue().strip().splitlines()[-1])


def one_line_error(code, err, *needles):
    assert code == 2
    assert err.startswith("meanflow: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# ---------------------------------------------------------------------------- ADM crop
def test_adm_crop_halves_with_box_then_cuts_the_centre():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)  # H x W = 40 x 70
    crop = adm_center_crop(Image.fromarray(pixels), 20)
    assert crop.size == (20, 20) and crop.mode == "RGB"
    # 40 >= 2 * 20: halve to 35 x 20 by 2x2 averages; the shorter side is then 20 = size, so
    # scaling is the identity and the centre columns (35 - 20) // 2 = 7 ... 26 survive
    halves = pixels.reshape(20, 2, 35, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(np.asarray(crop, np.float64) - halves[:, 7:27]).max() <= 1
    # portrait: the crop is taken in y
    tall = adm_center_crop(Image.fromarray(pixels.transpose(1, 0, 2).copy()), 20)
    assert np.abs(np.asarray(tall, np.float64) - halves.transpose(1, 0, 2)[7:27]).max() <= 1


def test_adm_crop_scales_shorter_side_bicubic_and_rounds():
    rng = np.random.default_rng(2)
    wide = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))  # W 30, H 20
    # no halving (20 < 32); scale 16 / 20 -> 24 x 16; columns 4 ... 19 survive
    expected = np.asarray(wide.resize((24, 16), BICUBIC))[:, 4:20]
    assert np.array_equal(np.asarray(adm_center_crop(wide, 16)), expected)
    # upscaling a small image: 13 x 10 (W x H) -> scale 1.6 -> round(20.8) = 21 x 16, rows 2..17
    small = Image.fromarray(rng.integers(0, 256, (13, 10, 3), dtype=np.uint8))
    expected = np.asarray(small.resize((16, 21), BICUBIC))[2:18]
    assert np.array_equal(np.asarray(adm_center_crop(small, 16)), expected)
    # two halvings (70 -> 35 -> 17), then 32 x 17 scaled by 16/17 -> round(30.1) = 30 x 16
    big = Image.fromarray(rng.integers(0, 256, (70, 130, 3), dtype=np.uint8))
    step = big.resize((65, 35), BOX).resize((32, 17), BOX).resize((30, 16), BICUBIC)
    assert np.array_equal(np.asarray(adm_center_crop(big, 16)), np.asarray(step)[:, 7:23])


def test_adm_crop_makes_rgb():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    crop = np.asarray(adm_center_crop(gray, 16))
    assert crop.shape == (16, 16, 3)
    assert np.array_equal(crop[..., 0], np.asarray(gray)) and (crop == crop[..., :1]).all()


# -------------------------------------------------------------------------- the encoder
def test_encode_cli_writes_the_posterior_of_each_crop_and_its_flip(encoded, image_dir, vae,
                                                                   vae_dir):
    out, line = encoded
    assert line["count"] == 24 and line["shape"] == [4, 8, 8] and line["shards"] == 3
    meta = json.load(open(os.path.join(out, "latents.json")))
    assert meta["format"] == "meanflow-latents" and meta["version"] == 1
    assert meta["complete"] is True and meta["count"] == 24 and meta["flips"] == 2
    assert meta["shape"] == [4, 8, 8] and meta["dtype"] == "float32"
    assert meta["scaling_factor"] == pytest.approx(0.18215) and meta["shift_factor"] is None
    assert meta["vae"] == os.path.abspath(vae_dir) and meta["source"] == image_dir
    assert meta["image_size"] == SIZE and meta["class_names"] == CLASSES
    assert meta["shard_size"] == 8
    assert [s["count"] for s in meta["shards"]] == [8, 8, 8]
    assert meta["shards"][1] == {"moments": "moments-00001.npy", "labels": "labels-00001.npy",
                                 "count": 8}

    moments = np.concatenate([np.load(os.path.join(out, s["moments"])) for s in meta["shards"]])
    labels = np.concatenate([np.load(os.path.join(out, s["labels"])) for s in meta["shards"]])
    assert moments.shape == (24, 2, 2, 4, 8, 8) and moments.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8

    files = [os.path.join(image_dir, c, n) for c in CLASSES
             for n in sorted(os.listdir(os.path.join(image_dir, c)))]
    crops = np.stack([np.asarray(adm_center_crop(Image.open(f), SIZE)) for f in files])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        for f, images in enumerate((x, x.flip(-1))):
            posterior = vae.encode(images).latent_dist  # diffusers' own call, one batch
            # batches of 5 (with flips) vs one batch of 24: float32 round-off only
            assert np.allclose(moments[:, f, 0], posterior.mean.numpy(), atol=1e-5)
            assert np.allclose(moments[:, f, 1], posterior.std.numpy(), atol=1e-5, rtol=1e-4)
    assert not np.allclose(moments[:, 0], moments[:, 1], atol=1e-3)  # the flip is encoded
    assert (moments[:, :, 1] > 0).all()


def test_latent_shards_reads_in_the_order_asked(encoded):
    out, _ = encoded
    shards = LatentShards(out)
    assert shards._maps == {}  # opening maps nothing
    assert len(shards) == shards.count == 24 and shards.shape == (4, 8, 8) and shards.flips == 2
    assert shards.scaling_factor == pytest.approx(0.18215) and shards.shift_factor is None
    assert shards.class_names == CLASSES and shards.num_classes == 3
    assert shards.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    everything = np.concatenate([np.load(os.path.join(out, f"moments-{k:05d}.npy"))
                                 for k in range(3)])
    indices = np.array([23, 0, 9, 9, 7, 16, 3, 15, 8])  # unsorted, repeated, all three shards
    got = shards.moments(indices)
    assert got.dtype == np.float32 and np.array_equal(got, everything[indices])
    assert shards.moments(np.array([], np.int64)).shape == (0, 2, 2, 4, 8, 8)
    with pytest.raises(MeanFlowError, match="out of range"):
        shards.moments(np.array([24]))

    clone = pickle.loads(pickle.dumps(shards))  # memory maps stay behind
    assert clone._maps == {} and np.array_equal(clone.moments(indices), got)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, shards):
        self.shards = shards

    def __len__(self):
        return len(self.shards)

    def __getitem__(self, i):
        return torch.from_numpy(self.shards.moments(np.array([i]))[0])


def test_latent_shards_in_a_dataloader_worker(encoded):
    shards = LatentShards(encoded[0])
    shards.moments(np.array([0, 20]))  # maps in the parent process first
    loader = torch.utils.data.DataLoader(_Rows(shards), batch_size=6, num_workers=1)
    rows = torch.cat(list(loader)).numpy()
    assert np.array_equal(rows, shards.moments(np.arange(24)))


def test_resume_after_a_kill_gives_the_same_files(encoded, image_dir, vae_dir, tmp_path,
                                                  monkeypatch, capsys):
    import meanflow.data.encode as command

    reference, _ = encoded
    out = str(tmp_path / "killed")
    write = command._write_shard
    calls = []

    def write_then_die(*args, **kwargs):
        if calls:
            # a half-written orphan of the next shard, as a kill during np.save leaves it
            with open(os.path.join(out, "moments-00001.npy.tmp"), "wb") as handle:
                handle.write(b"\x93NUMPY garbage")
            raise KeyboardInterrupt
        calls.append(1)
        return write(*args, **kwargs)

    monkeypatch.setattr(command, "_write_shard", write_then_die)
    code, _, err = run(capsys, *encode_args(image_dir, vae_dir, out))
    assert code == 130 and "interrupted" in err
    meta = json.load(open(os.path.join(out, "latents.json")))
    assert meta["complete"] is False and len(meta["shards"]) == 1
    assert is_latents_dir(out)
    with pytest.raises(MeanFlowError, match=r"rerun `meanflow latents encode \.\.\.` to finish"):
        LatentShards(out)

    monkeypatch.setattr(command, "_write_shard", write)
    code, printed, _ = run(capsys, *encode_args(image_dir, vae_dir, out))
    assert code == 0 and json.loads(printed)["count"] == 24
    names = sorted(n for n in os.listdir(reference))
    assert sorted(n for n in os.listdir(out) if not n.endswith(".tmp")) == names
    match, mismatch, errors = filecmp.cmpfiles(reference, out, names, shallow=False)
    assert mismatch == [] and errors == []

    # a shard lost after the end: the rerun writes it again; a complete rerun changes nothing
    os.remove(os.path.join(out, "moments-00002.npy"))
    with pytest.raises(MeanFlowError, match="is missing"):
        LatentShards(out)
    assert run(capsys, *encode_args(image_dir, vae_dir, out))[0] == 0
    assert run(capsys, *encode_args(image_dir, vae_dir, out))[0] == 0
    assert filecmp.cmpfiles(reference, out, names, shallow=False)[1:] == ([], [])


def test_other_settings_in_an_existing_out_are_refused(encoded, image_dir, vae_dir, capsys):
    out, _ = encoded
    before = open(os.path.join(out, "latents.json")).read()
    args = list(encode_args(image_dir, vae_dir, out))
    one_line_error(*run(capsys, *args[:9], "8", *args[10:])[::2], "image_size is 16 there but 8",
                   "--image-size")
    one_line_error(*run(capsys, *args, "--no-flip")[::2], "flips", "choose another --out")
    one_line_error(*run(capsys, *args, "--dtype", "float16")[::2], "dtype")
    assert open(os.path.join(out, "latents.json")).read() == before


def test_flat_folder_float16_without_flips_by_default(tmp_path, vae_dir, capsys):
    """By default each image is encoded once, unmirrored: the MeanFlow authors' encoder
    (meanflow ``utils/data_util.py`` compute_latent_dataset: centre crop, ToTensor, Normalize,
    no flip) stores one latent per image."""
    data = tmp_path / "flat"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = str(tmp_path / "lat")
    code, printed, _ = run(capsys, "latents", "encode", "--data", str(data), "--vae", vae_dir,
                           "--out", out, "--image-size", "8", "--dtype", "float16",
                           "--quiet", "--threads", "1")
    assert code == 0 and json.loads(printed)["shape"] == [4, 4, 4]
    assert sorted(os.listdir(out)) == ["latents.json", "moments-00000.npy"]
    shards = LatentShards(out)
    assert shards.flips == 1 and shards.labels is None and shards.class_names is None
    assert shards.num_classes == 0 and shards.dtype == "float16"
    assert np.load(os.path.join(out, "moments-00000.npy")).dtype == np.float16
    assert shards.moments(np.array([2, 0])).dtype == np.float32
    stored = np.load(os.path.join(out, "moments-00000.npy"))
    assert np.array_equal(shards.moments(np.array([2, 0])), stored[[2, 0]].astype(np.float32))


def test_encode_errors_are_one_line(tmp_path, image_dir, vae_dir, capsys):
    out = str(tmp_path / "out")
    args = list(encode_args(image_dir, vae_dir, out))
    one_line_error(*run(capsys, *args[:3], str(tmp_path / "nope"), *args[4:])[::2],
                   "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(*run(capsys, *args[:3], str(tmp_path / "empty"), *args[4:])[::2], "is empty")
    one_line_error(*run(capsys, *args[:5], str(tmp_path / "novae"), *args[6:])[::2],
                   "does not exist", "huggingface-cli download")
    one_line_error(*run(capsys, *args[:9], "15", *args[10:])[::2],
                   "not a multiple of the VAE's downsampling factor 2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    one_line_error(*run(capsys, *args[:7], str(tmp_path / "busy"), *args[8:])[::2],
                   "not a latents directory")
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(image_dir, "cat"), broken / "cat")
    (broken / "cat" / "bad.png").write_bytes(b"not a png")
    one_line_error(*run(capsys, *args[:3], str(broken), *args[4:])[::2], "bad.png",
                   "cannot read the image")


def test_help_of_the_nested_command(capsys):
    code, out, _ = run(capsys, "latents", "encode", "--help")
    assert code == 0 and "--vae" in out and "--threads" in out and "--no-flip" in out


def test_latent_shards_refuses_what_is_not_latents(tmp_path):
    assert not is_latents_dir(str(tmp_path))
    with pytest.raises(MeanFlowError, match="is not a latents directory"):
        LatentShards(str(tmp_path))
    (tmp_path / "latents.json").write_text('{"format": "other"}')
    assert not is_latents_dir(str(tmp_path))
    with pytest.raises(MeanFlowError, match="is not a meanflow-latents file"):
        LatentShards(str(tmp_path))


# ---------------------------------------------------------------- posterior samples
def test_draw_latents_is_the_reparameterised_sample():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(6, 2, 2, 4, 3, 3, generator=g)
    moments[:, :, 1] = moments[:, :, 1].abs() + 0.1
    z = draw_latents(moments, torch.Generator().manual_seed(5), 0.18215, flip=True)
    g = torch.Generator().manual_seed(5)  # documented order: the flip choice, then eps
    f = torch.randint(0, 2, (6,), generator=g)
    eps = torch.randn(6, 4, 3, 3, generator=g)
    rows = moments[torch.arange(6), f]
    assert torch.allclose(z, (rows[:, 0] + rows[:, 1] * eps) * 0.18215, atol=1e-7)
    shifted = draw_latents(moments, torch.Generator().manual_seed(5), 0.3611, shift_factor=0.1159,
                           flip=True)
    assert torch.allclose(shifted, (rows[:, 0] + rows[:, 1] * eps - 0.1159) * 0.3611, atol=1e-7)
    # float16 moments are sampled in float32
    half = draw_latents(moments.half(), torch.Generator().manual_seed(5), 1.0, flip=True)
    assert half.dtype == torch.float32
    assert torch.equal(half, draw_latents(moments.half().float(),
                                          torch.Generator().manual_seed(5), 1.0, flip=True))


def test_draw_latents_statistics_and_flip_choice():
    n = 20000
    mean = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    moments = torch.zeros(n, 2, 2, 2, 1, 1)
    moments[:, 0, 0], moments[:, 0, 1] = mean, 0.5  # the image: N(mean, 0.25)
    moments[:, 1, 0], moments[:, 1, 1] = 7.0, 0.0  # its flip: exactly 7
    z = draw_latents(moments, torch.Generator().manual_seed(1), 2.0, flip=True)
    flipped = (z == 14.0).all(dim=(1, 2, 3))
    # the flip is drawn with probability 1/2 per row: 4 standard deviations of a binomial
    assert abs(flipped.float().mean().item() - 0.5) < 4 * 0.5 / n ** 0.5
    # off by default, as the authors' LatentDataset (it never flips): always the stored image
    z = draw_latents(moments, torch.Generator().manual_seed(2), 2.0)
    assert not (z == 14.0).all(dim=(1, 2, 3)).any()
    # (mean + 0.5 eps) * 2 ~ N(2 mean, 1): 5 standard errors
    assert torch.allclose(z.mean(0).flatten(), 2 * mean.flatten(), atol=5 / n ** 0.5)
    assert torch.allclose(z.std(0).flatten(), torch.ones(2), atol=5 * 0.71 / n ** 0.5)
    single = draw_latents(moments[:, :1], torch.Generator().manual_seed(3), 2.0, flip=True)
    assert not (single == 14.0).all(dim=(1, 2, 3)).any()


# ------------------------------------------------------------------------- the VAE
def test_decode_of_encode(vae):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encode(vae, images)
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == torch.float32
    assert (std > 0).all()
    decoded = decode(vae, mean * 0.18215, 0.18215)
    assert decoded.shape == (2, 3, 16, 16) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():  # the VAE sees z / scale + shift
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        direct = vae.decode(z / 0.5 + 0.25).sample.clamp(-1, 1)
    assert torch.allclose(decode(vae, z, 0.5, shift_factor=0.25), direct, atol=1e-6)


def test_load_vae_without_diffusers(vae_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(MeanFlowError) as info:
        load_vae(vae_dir, "cpu")
    assert str(info.value) == ("VAE latents need diffusers; run "
                               "`pip install 'meanflow[latents]'`")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    one_line_error(*run(capsys, "latents", "encode", "--data", str(tmp_path / "imgs"), "--vae",
                        vae_dir, "--out", str(tmp_path / "o"), "--quiet")[::2],
                   "pip install 'meanflow[latents]'")


def test_not_a_vae_folder(tmp_path, vae_dir):
    with pytest.raises(MeanFlowError, match="is not a diffusers VAE folder.*config.json"):
        load_vae(str(tmp_path), "cpu")
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(MeanFlowError, match="UNet2DModel model, not an AutoencoderKL"):
        load_vae(str(tmp_path), "cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(vae_dir, "config.json"), pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MeanFlowError, match="pickled .bin weights are refused"):
        load_vae(str(pickled), "cpu")
    # a whole pipeline folder: its vae/ sub-folder is used
    pipeline = tmp_path / "pipeline"
    shutil.copytree(vae_dir, pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    assert find_vae_dir(str(pipeline)) == str(pipeline / "vae")
