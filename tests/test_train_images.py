"""Image runs end to end: data resolution, class-conditional training, grids, samples, presets."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meanflow import GuidedFlowMatching, GuidedMeanFlow, MeanFlow, MeanFlowError
from meanflow.cli import main
from meanflow.config.build import build_model, build_objective
from meanflow.config.presets import PRESETS, default_preset
from meanflow.data import open_data
from meanflow.runs.checkpoint import latest_checkpoint, load_checkpoint
from meanflow.runs.noise import sample_noise
from meanflow.train import TrainConfig, configure, load_run
from meanflow.train.optimizer import build_optimizer

Image = pytest.importorskip("PIL.Image")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_class_folder(root, classes=("circle", "square"), per_class=12, size=8, seed=0):
    """PNG images in one sub-folder per class: bright centre blobs or bright frames."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 40, size=(size, size)).astype(np.uint8)
            if k % 2 == 0:
                img[size // 4:-size // 4, size // 4:-size // 4] = 230
            else:
                img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = 230
            Image.fromarray(img, mode="L").save(root / name / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 6-step class-conditional run on an 8x8 two-class folder, with flips and grids."""
    root = tmp_path_factory.mktemp("img")
    data = make_class_folder(root / "train")
    out = str(root / "run")
    assert main(["train", "--data", data, "--out", out, "--preset", "unet-small", "--steps", "6",
                 "--batch-size", "8", "--hflip", "--set", "grid_every=3", "--set",
                 "log_every=2", "--set", "ckpt_every=3", "--set", "grid_num=6", "--quiet"]) == 0
    return out, data


def test_open_data_resolves_every_source(tmp_path):
    folder = open_data(make_class_folder(tmp_path / "f"))
    assert folder.kind == "images" and folder.shape == (1, 8, 8) and folder.num_classes == 2
    assert folder.class_names == ["circle", "square"] and folder.labels.tolist()[:13] == [0] * 12 + [1]
    assert float(folder.x.min()) >= -1 and float(folder.x.max()) <= 1
    digits = open_data("digits", size=8)
    assert digits.shape == (1, 8, 8) and len(digits) == 1797 and digits.num_classes == 10
    latents = np.random.default_rng(0).normal(size=(10, 4, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "lat.npz", x=latents, y=np.arange(10) % 3)
    arrays = open_data(str(tmp_path / "lat.npz"))
    assert arrays.kind == "arrays" and arrays.shape == (4, 4, 4) and arrays.num_classes == 3
    assert torch.equal(arrays.x, torch.from_numpy(latents))
    toy = open_data("two-moons", num=50, seed=1)
    assert toy.kind == "vectors" and toy.shape == (2,) and toy.labels is None
    with pytest.raises(MeanFlowError, match="did you mean 'fashion-mnist'"):
        open_data("fashion-mnst")
    with pytest.raises(MeanFlowError, match="--data-dir"):
        open_data("cifar10")


def test_open_data_fashion_mnist_and_cifar_folders(tmp_path):
    from test_images import _cifar_record, _idx_pair

    (tmp_path / "fm").mkdir()
    _idx_pair(tmp_path / "fm", "train", n=6)
    _idx_pair(tmp_path / "fm", "t10k", n=3, compress=True)
    named = open_data("fashion-mnist", directory=str(tmp_path / "fm"))
    assert named.shape == (1, 28, 28) and len(named) == 6 and named.class_names[9] == "Ankle boot"
    assert len(open_data("fashion-mnist", directory=str(tmp_path / "fm"), split="test")) == 3
    folder = open_data(str(tmp_path / "fm"))  # a folder of IDX files is recognised as such
    assert torch.equal(folder.x, named.x) and folder.labels.tolist() == named.labels.tolist()
    (tmp_path / "c").mkdir()
    for i in range(1, 6):
        (tmp_path / "c" / f"data_batch_{i}.bin").write_bytes(_cifar_record(i, (0, 0, 255)))
    cifar = open_data("cifar10", directory=str(tmp_path / "c"))
    assert cifar.shape == (3, 32, 32) and cifar.labels.tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(open_data(str(tmp_path / "c")).x, cifar.x)


def test_default_preset_follows_the_data():
    assert default_preset("vectors", (2,)) == "toy-2d"
    assert default_preset("vectors", (7,)) == "vectors"
    assert default_preset("images", (1, 28, 28), "fashion-mnist") == "fashion-mnist-small"
    assert default_preset("images", (1, 16, 16), "digits") == "digits-small"
    assert default_preset("images", (3, 30, 30), "my/folder") == "unet-small"


def test_image_presets_guidance_scales_reach_the_objective():
    """digits-small trains at w' = omega / (1 - kappa) = 0.5 / 0.5 = 1 (measured: FD 6-7x
    lower than at 2); the other CPU image presets keep w' = 2."""
    scale = {name: build_objective(configure(TrainConfig(), name, []), 10).effective_scale
             for name in ("digits-small", "fashion-mnist-small", "unet-small")}
    assert scale == {"digits-small": 1.0, "fashion-mnist-small": 2.0, "unet-small": 2.0}


def test_image_run_writes_grids_loss_curve_and_labels(image_run):
    out, _ = image_run
    names = set(os.listdir(out))
    assert {"samples-1step.png", "loss.png", "samples", "checkpoints", "config.json"} <= names
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step-00000003.png",
                                                               "step-00000006.png"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["data_shape"] == "1x8x8" and config["num_classes"] == 2
    assert config["preset"] == "unet-small" and config["hflip"] is True
    _, meta = load_checkpoint(latest_checkpoint(out))
    assert meta["shape"] == [1, 8, 8] and meta["class_names"] == ["circle", "square"]
    # 6 images, one column per class: 3 rows of 2 tiles of 8x8 shown at 8x, 2 px padding, below
    # a strip naming the classes (tests/test_plotting.py checks the strip)
    with Image.open(os.path.join(out, "samples-1step.png")) as grid:
        assert grid.size[0] == (2 * 10 + 2) * 8 and grid.size[1] > (3 * 10 + 2) * 8


def test_sample_npz_png_and_class_selection(image_run, tmp_path, capsys):
    out, _ = image_run
    npz = str(tmp_path / "s.npz")
    code, stdout, _ = run(capsys, "sample", "--run", out, "--num", "5", "--class", "square",
                          "--out", npz)
    assert code == 0 and json.loads(stdout)["classes"] == [1]
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [1] * 5
    # the uint8 images are round((x + 1) * 127.5) of the one-step samples e - u(e, 0, 1 | y)
    loaded = load_run(out)
    e = sample_noise((1, 8, 8), seed=0, start=0, stop=5)  # runs/noise.py
    with torch.no_grad():
        x = e - loaded.model(e, torch.zeros(5), torch.ones(5), y=torch.ones(5, dtype=torch.long))
    expect = np.clip(np.rint((x.numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.abs(images.transpose(0, 3, 1, 2).astype(int) - expect).max() <= 1
    code, stdout, _ = run(capsys, "sample", "--run", out, "--num", "4", "--class", "0,1",
                          "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert code == 0 and open(tmp_path / "g.png", "rb").read(4) == b"\x89PNG"
    code, stdout, _ = run(capsys, "sample", "--run", out, "--num", "3", "--class", "none",
                          "--out", str(tmp_path / "u.npy"))
    assert code == 0 and np.load(tmp_path / "u.npy").shape == (3, 1, 8, 8)


def test_sampling_guidance_flag(image_run, tmp_path, capsys):
    """--guidance W samples u_null + W (u_y - u_null): two evaluations per step."""
    out, data = image_run
    code, stdout, err = run(capsys, "sample", "--run", out, "--num", "4", "--guidance", "3",
                            "--out", str(tmp_path / "g.npy"))
    assert code == 0 and json.loads(stdout)["guidance"] == 3.0, err
    loaded = load_run(out)
    e = sample_noise((1, 8, 8), seed=0, start=0, stop=4)  # runs/noise.py
    y = torch.arange(4) % 2
    with torch.no_grad():
        c = loaded.model(e, torch.zeros(4), torch.ones(4), y=y)
        n = loaded.model(e, torch.zeros(4), torch.ones(4), y=torch.full_like(y, 2))
    x = loaded.normalizer.decode(e - (n + 3 * (c - n)))
    assert np.allclose(np.load(tmp_path / "g.npy"), x.numpy(), atol=1e-5)
    code, stdout, err = run(capsys, "eval", "--run", out, "--reference", data, "--num", "6",
                            "--metric", "swd", "--steps", "2", "--guidance", "1.5")
    result = json.loads(stdout)
    assert code == 0 and result["nfe"] == 4 and result["guidance"] == 1.5, err
    assert result["trained_guidance"] == loaded.trained_scale
    code, stdout, err = run(capsys, "eval", "--run", out, "--reference", data, "--num", "6",
                            "--metric", "swd", "--schedule", "1,0.3,0", "--guidance", "2")
    result = json.loads(stdout)
    assert code == 0 and (result["steps"], result["nfe"]) == (2, 4), err
    assert result["schedule"] == [1.0, 0.3, 0.0]


def test_image_eval_prints_pixel_space_distances(image_run, capsys):
    out, data = image_run
    code, stdout, _ = run(capsys, "eval", "--run", out, "--reference", data, "--num", "20",
                          "--metric", "swd")
    result = json.loads(stdout)
    assert code == 0 and result["reference_num"] == 24 and result["swd"] > 0


def test_conditional_image_resume_is_bitwise_identical(tmp_path, capsys):
    """Labels, label dropout, guidance and flips all draw from the checkpointed generator."""
    data = make_class_folder(tmp_path / "d", per_class=6)
    args = ["--data", data, "--preset", "unet-small", "--batch-size", "4", "--hflip", "--set",
            "ckpt_every=2", "--set", "grid_every=0", "--set", "model.dropout=0", "--quiet"]
    assert run(capsys, "train", "--out", str(tmp_path / "a"), "--steps", "5", *args)[0] == 0
    assert run(capsys, "train", "--out", str(tmp_path / "b"), "--steps", "2", *args)[0] == 0
    assert run(capsys, "train", "--out", str(tmp_path / "b"), "--steps", "5", "--resume",
               "--quiet")[0] == 0
    a = load_file(latest_checkpoint(str(tmp_path / "a")) + ".safetensors")
    b = load_file(latest_checkpoint(str(tmp_path / "b")) + ".safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.", "optim.")))


def test_unconditional_flag_ignores_labels(tmp_path, capsys):
    data = make_class_folder(tmp_path / "d", per_class=4)
    out = str(tmp_path / "u")
    assert run(capsys, "train", "--data", data, "--out", out, "--preset", "unet-small",
               "--steps", "1", "--batch-size", "4", "--unconditional", "--quiet")[0] == 0
    loaded = load_run(out)
    assert loaded.num_classes == 0 and loaded.model.cond.label is None
    code, _, err = run(capsys, "sample", "--run", out, "--num", "2", "--class", "1",
                       "--out", str(tmp_path / "x.npy"))
    assert code == 2 and "unconditional" in err


def test_objective_choice_follows_labels_and_flag():
    cfg = TrainConfig()
    assert type(build_objective(cfg, 0)) is MeanFlow
    guided = build_objective(configure(cfg, None, [("guidance.kappa", 0.5)]), 10)
    assert type(guided) is GuidedMeanFlow and guided.effective_scale == 2.0
    fm = build_objective(configure(cfg, None, [("objective", "flow-matching")]), 10)
    assert type(fm) is GuidedFlowMatching
    x, y = torch.randn(16, 3), torch.randint(0, 10, (16,))
    model = build_model(cfg, (3,), 10)
    out = fm(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.r, out.t)


PAPER_MILLIONS = {"imagenet256-b2": 131, "imagenet256-m2": 308, "imagenet256-l2": 459,
                  "imagenet256-xl2": 676}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dry_run_prints_preset_and_parameter_count(preset, capsys):
    data = [] if "data" in PRESETS[preset] or "data_shape" in PRESETS[preset] else \
        ["--data", "rings"] if preset in ("mlp", "toy-2d", "vectors", "tiny") else \
        ["--data", "digits"]
    code, stdout, err = run(capsys, "train", "--preset", preset, "--dry-run", *data)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["preset"] == preset and result["parameters"] > 0
    if preset in PAPER_MILLIONS:
        assert abs(result["parameters"] / 1e6 / PAPER_MILLIONS[preset] - 1) < 0.02
        assert result["num_classes"] == 1000 and result["data_shape"] == [4, 32, 32]


def _one_step(cfg: TrainConfig, batch: int = 2) -> None:
    """Build the preset's network, objective and optimizer and take one step on random data,
    with r < t in the first row so the JVP runs."""
    shape, classes = cfg.shape, cfg.num_classes if cfg.conditional else 0
    torch.manual_seed(0)
    model = build_model(cfg, shape, classes)
    objective = build_objective(cfg, classes)
    optimizer = build_optimizer(cfg, model)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,)) if classes else None
    t, r = torch.full((batch,), 0.6), torch.tensor([0.2] + [0.6] * (batch - 1))
    out = objective(model, x, y, r=r, t=t, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    probe = next(p for p in reversed(list(model.parameters())) if p.grad is not None)
    before = probe.detach().clone()
    optimizer.step()
    assert torch.isfinite(out.loss) and not torch.equal(before, probe.detach())


@pytest.mark.parametrize("preset", [p for p in sorted(PRESETS)
                                    if PRESETS[p].get("model.arch") in ("unet", "dit")])
def test_every_image_preset_takes_one_step_on_cpu(preset):
    cfg = configure(TrainConfig(), preset, [])
    if not cfg.data_shape:
        cfg.data_shape = "3x16x16"
    if cfg.model.arch == "dit" and cfg.model.size != "B/4":
        # the big DiTs at a 2x2-patch input of 8x8 latents: same blocks and widths, 16 tokens
        cfg.data_shape = "4x8x8"
    _one_step(cfg)


def _image_bad_cases(tmp_path, image_run):
    out, data = image_run
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(corrupt / "ok.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(mixed / "b.png")
    other = make_class_folder(tmp_path / "other", classes=("cat", "dog"), per_class=3)
    bigger = make_class_folder(tmp_path / "bigger", per_class=3, size=12)
    new = ["train", "--out", str(tmp_path / "new"), "--quiet"]
    return {
        "empty folder": [*new, "--data", str(tmp_path / "empty")],
        "corrupt image": [*new, "--data", str(corrupt)],
        "mixed sizes": [*new, "--data", str(mixed)],
        "missing folder": [*new, "--data", str(tmp_path / "nowhere") + "/"],
        "cifar10 without dir": [*new, "--data", "cifar10"],
        "mlp on images": [*new, "--data", data, "--set", "model.arch=mlp"],
        "unknown dit size": [*new, "--data", data, "--set", "model.arch=dit",
                             "--set", "model.size=Q/2"],
        "flip vectors": [*new, "--data", "rings", "--hflip"],
        "detached with dropout": [*new, "--data", data, "--set", "loss.jvp=detached"],
        "bad guidance": [*new, "--data", data, "--set", "guidance.kappa=1.0"],
        "dry run without data": ["train", "--preset", "unet-small", "--dry-run"],
        "resume other data": ["train", "--out", out, "--resume", "--data", other],
        "eval classes differ": ["eval", "--run", out, "--reference", other, "--num", "4"],
        "eval other image size": ["eval", "--run", out, "--reference", str(bigger), "--num",
                                  "4"],
        "guidance without labels": ["sample", "--run", out, "--num", "2", "--class", "none",
                                    "--guidance", "2", "--out", str(tmp_path / "a.png")],
        "negative guidance": ["sample", "--run", out, "--num", "2", "--guidance", "-1",
                              "--out", str(tmp_path / "a.png")],
        "unknown class": ["sample", "--run", out, "--num", "2", "--class", "giraffe",
                          "--out", str(tmp_path / "a.png")],
    }


IMAGE_BAD_CASES = ["empty folder", "corrupt image", "mixed sizes", "missing folder",
                   "cifar10 without dir", "mlp on images", "unknown dit size", "flip vectors",
                   "detached with dropout", "bad guidance", "dry run without data",
                   "resume other data", "eval classes differ", "eval other image size",
                   "guidance without labels", "negative guidance", "unknown class"]


@pytest.mark.parametrize("case", IMAGE_BAD_CASES)
def test_image_bad_input_is_one_line_exit_2_and_touches_nothing(case, tmp_path, image_run,
                                                                capsys):
    out, _ = image_run
    argv = _image_bad_cases(tmp_path, image_run)[case]
    before = {os.path.join(d, n): os.path.getmtime(os.path.join(d, n))
              for d, _, names in os.walk(out) for n in names}
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("meanflow: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    after = {os.path.join(d, n): os.path.getmtime(os.path.join(d, n))
             for d, _, names in os.walk(out) for n in names}
    assert after == before
    assert not os.path.exists(tmp_path / "new") and not os.path.exists(tmp_path / "a.png")


def test_tensorboard_logs_or_one_clear_line(tmp_path, capsys):
    """With the optional tensorboard package: event files with the losses and grids; without
    it: one line saying how to install it, and no run directory."""
    data = make_class_folder(tmp_path / "d", per_class=4)
    out = tmp_path / "tb"
    code, _, err = run(capsys, "train", "--data", data, "--out", str(out), "--preset",
                       "unet-small", "--steps", "2", "--batch-size", "4", "--tensorboard",
                       "--set", "log_every=1", "--set", "grid_every=2", "--quiet")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert code == 2 and "pip install" in err and not out.exists()
        return
    assert code == 0, err
    events = [n for n in os.listdir(out / "tensorboard") if n.startswith("events.")]
    assert events and os.path.getsize(out / "tensorboard" / events[0]) > 0


def test_image_quality_probe_is_logged_and_keeps_resume_bitwise(tmp_path, capsys):
    """Digits at 16x16 has a shipped feature network: metrics.jsonl gets the FD of one-step EMA
    samples (and its floor) every grid_every steps, from the probe's own generators, so a run
    resumed halfway ends bitwise equal to an uninterrupted one, with the same FD."""
    args = ["--data", "digits", "--preset", "digits-small", "--batch-size", "16", "--set",
            "model.channels=8", "--set", "log_every=2", "--set", "grid_every=4", "--set",
            "ckpt_every=3", "--quiet", "--threads", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(capsys, "train", "--out", a, "--steps", "8", *args)[0] == 0
    assert run(capsys, "train", "--out", b, "--steps", "3", *args)[0] == 0
    assert run(capsys, "train", "--out", b, "--steps", "8", *args)[0] == 0
    records = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    probed = [r["step"] for r in records if "fd_1step" in r]
    assert probed == [2, 4, 8]  # the first record, then at each multiple of 4, and the end
    floor = {r["fd_floor"] for r in records if "fd_floor" in r}
    assert len(floor) == 1 and 0 < floor.pop() < min(r["fd_1step"] for r in records if "fd_1step" in r)
    wa = load_file(latest_checkpoint(a) + ".safetensors")
    wb = load_file(latest_checkpoint(b) + ".safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k.startswith(("model.", "ema.", "optim.")))
    last = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))][-1]
    assert last["fd_1step"] == records[-1]["fd_1step"]
