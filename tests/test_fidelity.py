"""Recipes pinned to the authors' published settings (issue: fidelity). Facts, with their
sources in the authors' code:

- py-meanflow ``meanflow/models/time_sampler.py``: the v1 sampler draws t and r independently,
  sets r = t with probability 1 - ratio, then r = min(t, r) (t unsorted); v0 sorts first.
  ``scripts/cifar10_v1.sh``: t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6), ratio 0.75, batch 8 x 128,
  16,000 epochs, 200 warm-up epochs; ``scripts/cifar10_v0.sh``: v0 with LN(-2, 2).
- meanflow (JAX) ``configs/default.py``: norm_eps 0.01, class_dropout_prob 0.1, P(-0.4, 1.0),
  data_proportion 0.75 (25% r != t), guidance_eq 'cfg' with omega 1.0, kappa 0.5,
  half_precision False, vae 'mse'; ``configs/run_b4.yml``: 240 epochs at batch 256.
  ``meanflow.py``: guidance_eq 'none' leaves v~ = v but cond_drop still drops 10% of labels.
  ``utils/data_util.py``: latents are encoded from the centre crop, no flip;
  ``utils/vae_util.py``: LatentDataset returns the stored latent (its use_flip is never read).
- README (JAX), MF-B/4 "Performance": guidance_eq none 61.09 (paper) / 60.75 (repo) at 80
  epochs, 48.16 at 240; cfg omega 1.0, kappa 0.5: 19.15 / 18.70 at 80, 11.35 at 240.
- The paper: Table 1 (B/4, 80 epochs, no guidance in a-e) 61.06 at its defaults; Table 2
  (240 epochs, 1-NFE) B/2 6.17, M/2 5.01, L/2 3.84, XL/2 3.43, 2-NFE XL/2 2.93 (no 2-NFE
  figure for B/2, M/2, L/2); Table 3 CIFAR-10 2.92.
"""

import math

import torch

from meanflow import TimeSampler
from meanflow.config.presets import PUBLISHED, configure
from meanflow.config.schema import TrainConfig


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_official_v1_sampler_statistics():
    n = 400_000
    sampler = TimeSampler(mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=0.75,
                          order="official-v1")
    r, t = sampler(n, generator=torch.Generator().manual_seed(0))
    assert bool((r <= t).all())
    # P(r < t) = ratio * P(b < a), a ~ N(-0.6, 1.6), b ~ N(-4, 1.6) in logit space
    expected = 0.75 * _phi((-0.6 + 4.0) / (1.6 * math.sqrt(2)))
    assert abs(expected - 0.700) < 0.002  # the "about 0.70"
    p = float((r < t).float().mean())
    assert abs(p - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    # t keeps its own law (unsorted): logit(t) ~ N(-0.6, 1.6)
    logit = torch.logit(t.double().clamp(1e-12, 1 - 1e-12))
    assert abs(float(logit.mean()) + 0.6) < 0.02 and abs(float(logit.std()) - 1.6) < 0.02
    # the sorted sampler: t is the max of two draws, P(r < t) = ratio
    r, t = TimeSampler(mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=0.75)(
        n, generator=torch.Generator().manual_seed(0))
    assert abs(float((r < t).float().mean()) - 0.75) < 0.005
    # logit(t) = max(a, b): Clark's formula for the mean of the max of two normals
    theta = math.hypot(1.6, 1.6)
    alpha = (-0.6 + 4.0) / theta
    clark = (-0.6 * _phi(alpha) - 4.0 * _phi(-alpha)
             + theta * math.exp(-alpha ** 2 / 2) / math.sqrt(2 * math.pi))
    assert abs(float(torch.logit(t.double()).mean()) - clark) < 0.015


def _preset(name):
    return configure(TrainConfig(), name)


def test_imagenet_presets_match_the_authors_config():
    for name in ("imagenet256-b4", "imagenet256-b4-ablation", "imagenet256-b2",
                 "imagenet256-xl2"):
        cfg = _preset(name)
        assert cfg.loss.c == 0.01 and cfg.loss.p == 1.0           # norm_eps, norm_p
        assert cfg.guidance.label_dropout == 0.1 and cfg.time.ratio == 0.25
        assert cfg.guidance.drop_rows == "r=t"
        assert (cfg.time.mean, cfg.time.std) == (-0.4, 1.0) and cfg.time.order == "sorted"
        assert (cfg.batch_size, cfg.optim.lr, cfg.optim.beta2) == (256, 1e-4, 0.95)
        # constant EMA 0.9999 every step (configs/default.py ema_val, utils/ema_util.py)
        assert (cfg.ema_decay, cfg.ema_every, cfg.ema_warmup) == (0.9999, 1, False)
    per_epoch = 1_281_167 // 256
    assert _preset("imagenet256-b4").steps == 240 * per_epoch
    assert _preset("imagenet256-b4-ablation").steps == 80 * per_epoch
    assert _preset("imagenet256-b2").steps == 240 * per_epoch


def test_cifar_presets_match_the_authors_scripts():
    per_epoch = (50_000 // 8) // 128  # DistributedSampler over 8 GPUs, drop_last
    assert per_epoch == 48
    for name, order, t, r in (("cifar10-paper", "sorted", (-2.0, 2.0), (None, None)),
                              ("cifar10-paper-improved", "official-v1", (-0.6, 1.6),
                               (-4.0, 1.6))):
        cfg = _preset(name)
        assert cfg.steps == 16_000 * per_epoch == 768_000
        assert cfg.optim.warmup == 200 * per_epoch == 9_600
        assert cfg.batch_size == 8 * 128 and cfg.optim.lr == 6e-4
        assert (cfg.loss.p, cfg.loss.c, cfg.time.ratio) == (0.75, 1e-3, 0.75)
        assert cfg.time.order == order and (cfg.time.mean, cfg.time.std) == t
        assert (cfg.time.r_mean, cfg.time.r_std) == r
        assert not cfg.conditional and cfg.model.dropout == 0.2
        # models/ema.py: period 16 with decay^16, no warm-up; train_arg_parser.py: 0.9999
        # plus 0.99995 and 0.9996; their demo samples with 0.99995
        assert (cfg.ema_every, cfg.ema_warmup) == (16, False)
        assert {cfg.ema_decay, *cfg.ema_extras} == {0.9999, 0.99995, 0.9996}
        assert cfg.ema_decay == 0.99995
        # train_loop.py: AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0,
        # aniso=1, translate_frac=1); data_transform.py: RandomHorizontalFlip
        assert (cfg.augment, cfg.augment_p, cfg.hflip) == ("edm-cifar10", 0.12, True)


def test_cifar_recipe_trains_with_augmentation_labels(tmp_path, capsys, monkeypatch):
    """The cifar10-paper recipe end to end at toy size: EDM augmentation at p = 0.12 (here p = 1
    so every step uses it), its labels reach the SongUNet, three EMAs every 16 steps."""
    import json

    from cli_helpers import run

    from meanflow.nn.songunet import SongUNet
    from meanflow.runs.checkpoint import load_latest_good

    seen = []
    forward = SongUNet.forward

    def spy(self, z, r, t, y=None, aug=None):
        seen.append(None if aug is None else aug.detach().clone())
        return forward(self, z, r, t, y=y, aug=aug)

    monkeypatch.setattr(SongUNet, "forward", spy)
    code, out, err = run(capsys, "train", "--data", "digits", "--image-size", "8",
                         "--preset", "cifar10-paper", "--set", "model.size=tiny",
                         "--set", "model.channels=8", "--steps", "16", "--batch-size", "8",
                         "--set", "augment_p=1.0", "--set", "grid_every=0",
                         "--set", "grid_num=4", "--set", "ckpt_every=16",
                         "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    assert json.loads(out)["skipped_steps"] == 0
    train_augs = [a for a in seen if a is not None]
    assert train_augs and all(a.shape[1] == 9 for a in train_augs)
    assert any(bool((a[:, [0, 2, 5, 6, 7, 8]] != 0).any()) for a in train_augs)
    assert all(bool((a[:, [1, 3, 4]] == 0).all()) for a in train_augs)  # y-flip, rotation off
    _, tensors, meta = load_latest_good(str(tmp_path / "run"))
    assert set(meta["emas"]) == {"ema", "ema-0.9999", "ema-0.9996"}
    assert any(k.startswith("ema-0.9996.") for k in tensors)


IMAGENET = ("imagenet256-b4", "imagenet256-b4-ablation", "imagenet256-b2", "imagenet256-m2",
            "imagenet256-l2", "imagenet256-xl2")


def test_imagenet_presets_train_unflipped_in_float32():
    """The authors encode the centre crop alone and their LatentDataset never flips; they
    train in float32 (half_precision False)."""
    for name in IMAGENET:
        cfg = _preset(name)
        assert cfg.hflip is False and cfg.precision == "fp32", name


def test_ablation_preset_is_the_table_1_setting():
    """Table 1 (a-e): B/4, 80 epochs, no guidance (guidance_eq 'none': v~ = v) with the 10%
    label dropout kept; FID 61.06. The B/4 preset keeps their default.py guidance, omega 1.0,
    kappa 0.5, for 240 epochs (README: 11.35)."""
    per_epoch = 1_281_167 // 256
    cfg = _preset("imagenet256-b4-ablation")
    assert (cfg.guidance.omega, cfg.guidance.kappa) == (1.0, 0.0)
    assert (cfg.guidance.t_min, cfg.guidance.t_max, cfg.guidance.label_dropout) == (0, 1, 0.1)
    assert cfg.model.size == "B/4" and cfg.steps == 80 * per_epoch
    b4 = _preset("imagenet256-b4")
    assert (b4.guidance.omega, b4.guidance.kappa) == (1.0, 0.5) and b4.model.size == "B/4"
    # M/2 and L/2: no values of their own are published; they take B/2's
    b2 = _preset("imagenet256-b2").guidance
    for name in ("imagenet256-m2", "imagenet256-l2"):
        g = _preset(name).guidance
        assert (g.omega, g.kappa, g.t_min, g.t_max) == (b2.omega, b2.kappa, b2.t_min, b2.t_max)
    assert (b2.omega, b2.kappa) == (1.0, 0.5)


def test_each_paper_preset_names_its_published_figure():
    expected = {
        "imagenet256-b4-ablation": (61.06, None, 80),
        "imagenet256-b4": (11.35, None, 240),
        "imagenet256-b2": (6.17, None, 240),
        "imagenet256-m2": (5.01, None, 240),
        "imagenet256-l2": (3.84, None, 240),
        "imagenet256-xl2": (3.43, 2.93, 240),
        "cifar10-paper": (2.92, None, 16_000),
    }
    assert {k: (p.fid_1step, p.fid_2step, p.epochs) for k, p in PUBLISHED.items()} == expected
    per_epoch = {"imagenet": 1_281_167 // 256, "cifar10": (50_000 // 8) // 128}
    for name, figure in PUBLISHED.items():
        data = "cifar10" if name.startswith("cifar10") else "imagenet"
        assert _preset(name).steps == figure.epochs * per_epoch[data]
    # the ablation figure is Table 1's default, the same as the ablation studies'
    from meanflow.train.ablation import STUDIES

    assert STUDIES["ratio"].paper["25%"] == PUBLISHED["imagenet256-b4-ablation"].fid_1step
    assert "61.09" in PUBLISHED["imagenet256-b4-ablation"].source  # the README's copy


def test_dry_run_shows_the_table_1_setting(capsys):
    import json

    from cli_helpers import run

    code, out, err = run(capsys, "train", "--preset", "imagenet256-b4-ablation", "--dry-run")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["guidance"]["omega"] == 1.0 and shown["guidance"]["kappa"] == 0.0
    assert shown["guidance"]["effective_scale"] == 1.0 and shown["hflip"] is False
    assert shown["reproduces"]["fid_1step"] == 61.06 and shown["reproduces"]["epochs"] == 80
    assert shown["steps"] == 80 * (1_281_167 // 256) and shown["precision"] == "fp32"


def test_recipe_reproduces_with_the_authors_vae_and_precision():
    """docs/recipes.md: encode with sd-vae-ft-mse (their vae 'mse'), no mirrors, and train in
    float32; bf16 is offered apart as the faster option."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "recipes.md")).read()
    commands = [line.strip() for line in text.splitlines() if "meanflow" in line
                and line.startswith("    ")]
    encode = [c for c in commands if "latents encode" in c]
    assert encode and all("sd-vae-ft-mse" in c and "--flip" not in c for c in encode)
    train = [c for c in commands if re.search(r"meanflow train .*--preset imagenet256", c)]
    assert train and "bf16" not in train[0]  # the reproduction command comes first
    assert "precision=bf16" in text  # offered apart
