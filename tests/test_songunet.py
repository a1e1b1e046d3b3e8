"""The authors' CIFAR-10 network (py-meanflow's SongUNet, EDM's DDPM++ with two time inputs).

Facts pinned here come from the authors' code (Gsunshine/py-meanflow, models/unet.py and
models/model_configs.py, scripts/cifar10_v*.sh), not from our own output.
"""

import json
import math

import pytest
import torch
from conftest import (
    assert_meanflow_output_is_the_formula,
    assert_total_derivative_matches_fd,
    jvp_inputs,
    perturbed,
)

from meanflow import MeanFlow, MeanFlowError
from meanflow.cli import main
from meanflow.nn import SONGUNET_CONFIGS, SongUNet, songunet
from meanflow.nn.songunet import SongBlock

# The authors' network as they train it (augment_dim 6 with --use_edm_aug), counted by building
# their SongUNet with their MODEL_CONFIGS["unet"] (channel_mult_noise 2, resample_filter
# [1, 3, 3, 1], channel_mult [2, 2, 2], standard encoder/decoder, EDM defaults otherwise):
# 55,932,419; without augmentation labels 55,929,347. Published: "55.9M" (issue 12).
# (Checked by loading their module's state dict into ours: outputs agree to 2e-6.)
AUTHORS_COUNT, AUTHORS_COUNT_NO_AUG, PUBLISHED = 55_932_419, 55_929_347, 55.9e6


def _count(**kw):
    with torch.device("meta"):
        model = songunet("cifar10-paper", 3, 32, **kw)
    return sum(p.numel() for p in model.parameters())


def _tiny(dtype=torch.float64, perturb=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = songunet("tiny", 3, 16, **kw).to(dtype)
    return perturbed(model) if perturb else model


def _inputs(b=3, dtype=torch.float64, seed=0):
    return jvp_inputs((3, 16, 16), b, dtype, seed)[:4]


def test_parameter_count_is_the_authors():
    count = _count()
    assert count == AUTHORS_COUNT
    assert abs(count - PUBLISHED) / PUBLISHED < 0.01
    assert _count(augment_dim=0) == AUTHORS_COUNT_NO_AUG
    assert _count(augment_dim=9) == AUTHORS_COUNT_NO_AUG + 9 * 512  # EDM's 9 labels
    cfg = SONGUNET_CONFIGS["cifar10-paper"]
    assert (cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"], cfg["dropout"]) \
        == (128, (2, 2, 2), 4, 0.2)


def test_dry_run_of_the_cifar10_preset_reports_55_9m(capsys):
    assert main(["train", "--preset", "cifar10-paper", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "SongUNet" and report["arch"] == "songunet"
    assert abs(report["parameters"] - PUBLISHED) / PUBLISHED < 0.01


def test_layout_of_the_cifar10_network():
    with torch.device("meta"):
        model = songunet("cifar10-paper", 3, 32)
    blocks = [m for m in model.modules() if isinstance(m, SongBlock)]
    assert len(blocks) == 2 + 12 + 2 + 2 + 15  # down, enc, mid, up, dec
    attn = [b for b in blocks if b.attention]
    assert len(attn) == 4 + 1 + 1  # 16x16 encoder blocks, middle, last 16x16 decoder block
    assert all(b.qkv.out_channels == 3 * 256 for b in attn)
    assert [b.resample for b in blocks].count("down") == 2
    assert [b.resample for b in blocks].count("up") == 2
    assert model.enc["32x32_conv"].out_channels == 128 and model.map_layer0.in_features == 512
    assert model.map_layer1.out_features == 512 and model.freqs.numel() == 128
    assert model.map_augment.weight.shape == (512, 6) and model.augment_columns == (0, 2, 5, 6, 7,
                                                                                    8)
    # EDM's parameter names, so that py-meanflow state dicts load as they are
    names = dict(model.named_parameters())
    for key in ("map_layer0.weight", "enc.16x16_down.skip.weight", "enc.16x16_block0.qkv.weight",
                "dec.8x8_in0.proj.bias", "dec.16x16_block4.qkv.weight",
                "dec.32x32_up.affine.bias",
                "dec.32x32_aux_norm.weight", "dec.32x32_aux_conv.weight"):
        assert key in names, key
    assert "dec.16x16_block3.qkv.weight" not in names
    fir = torch.tensor([1.0, 3, 3, 1])  # the authors' resample_filter (NCSN++'s FIR)
    assert torch.equal(songunet("tiny", 3, 16).enc["8x8_down"].fir.squeeze(), torch.outer(fir, fir) / 64)
    assert all(m.eps == 1e-6 and m.num_groups == min(32, m.num_channels // 4)
               for m in model.modules() if isinstance(m, torch.nn.GroupNorm))


def test_time_features_are_positional_embeddings_of_t_and_t_minus_r():
    model = _tiny()
    t, r = torch.tensor([0.7, 0.3], dtype=torch.float64), torch.tensor([0.2, 0.3],
                                                                       dtype=torch.float64)
    feats = model.time_features(r, t)
    n = model.freqs.numel()  # 16 frequencies from 1 down to exactly 1e-4 (EDM endpoint=True)
    assert feats.shape == (2, 4 * n)
    assert model.freqs[0] == 1 and math.isclose(model.freqs[-1].item(), 1e-4, rel_tol=1e-6)
    f = model.freqs.double()
    expect = torch.cat([(t[:, None] * f).sin(), (t[:, None] * f).cos(),
                        ((t - r)[:, None] * f).sin(), ((t - r)[:, None] * f).cos()], dim=1)
    assert torch.allclose(feats, expect)  # times as they are: no x1000
    assert torch.equal(feats[1, 2 * n:], torch.cat([torch.zeros(n), torch.ones(n)]).double())


def test_output_shape_and_near_zero_init():
    model = _tiny(dtype=torch.float32, perturb=False).eval()
    z, r, t, _ = _inputs(dtype=torch.float32)
    u = model(z, r, t)
    assert u.shape == z.shape and u.dtype == z.dtype
    assert 0 < u.abs().max() < 1e-3  # last conv scaled by 1e-5: small, not exactly zero
    out_conv = model.dec["16x16_aux_conv"]
    assert out_conv.bias.abs().max() == 0 and 0 < out_conv.weight.abs().max() < 1e-4


def test_skip_scaling_is_sqrt_half():
    torch.manual_seed(0)
    fir = torch.ones(1, 1, 2, 2) / 4
    block = SongBlock(8, 8, 16, 0.0, fir).double()
    attn = SongBlock(8, 8, 16, 0.0, fir, attention=True).double()
    with torch.no_grad():
        for b in (block, attn):
            b.conv1.weight.zero_()
        attn.proj.weight.zero_()
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    assert torch.allclose(block(x, emb), x * math.sqrt(0.5))
    assert torch.allclose(attn(x, emb), x * 0.5)  # residual block, then residual attention


def test_output_depends_on_r_through_t_minus_r():
    model = _tiny().eval()
    z, r, t, _ = _inputs()
    u = model(z, r, t)
    assert not torch.allclose(u, model(z, r * 0.5, t))  # t - r changed
    same = model(z, t, t)  # r = t: the second embedding is that of 0 ([0.., 1..])
    assert torch.isfinite(same).all() and not torch.allclose(same, u)
    assert torch.allclose(model(z, torch.zeros_like(t), t), model(z, -t + t, t))


def test_augmentation_labels_enter_the_embedding():
    z, r, t, _ = _inputs()
    model = _tiny(augment_dim=6).eval()  # aug of shape (B, 6) as it is
    aug = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(model(z, r, t), model(z, r, t, aug=torch.zeros_like(aug)))
    assert not torch.allclose(model(z, r, t), model(z, r, t, aug=aug))
    assert model.map_augment.bias is None
    with pytest.raises(MeanFlowError):
        model(z, r, t, aug=torch.zeros(3, 9, dtype=torch.float64))
    with pytest.raises(MeanFlowError):
        _tiny()(z, r, t, aug=aug)  # augment_dim 0
    # the authors' six labels are columns 0, 2, 5, 6, 7, 8 of EDM's nine (meanflow.data.augment)
    cols = (0, 2, 5, 6, 7, 8)
    picky = _tiny(augment_dim=6, augment_columns=cols).eval()
    with torch.no_grad():
        picky.map_augment.weight.copy_(model.map_augment.weight)
        for a, b in zip(picky.parameters(), model.parameters()):
            a.copy_(b)
    nine = torch.zeros(3, 9, dtype=torch.float64)
    nine[:, list(cols)] = aug
    assert torch.allclose(picky(z, r, t, aug=nine), model(z, r, t, aug=aug))
    unused = torch.zeros(3, 9, dtype=torch.float64)
    unused[:, [1, 3, 4]] = 1.0  # y-flip and rotation: not read
    assert torch.equal(picky(z, r, t, aug=unused), picky(z, r, t))
    with pytest.raises(MeanFlowError):
        picky(z, r, t, aug=aug)


@pytest.mark.parametrize("conditional", [False, True])
def test_jvp_matches_central_finite_difference(conditional):
    model = _tiny(num_classes=10 if conditional else 0, dropout=0.0).eval()
    z, r, t, v = _inputs()
    y = torch.tensor([0, 3, 9]) if conditional else None
    assert_total_derivative_matches_fd(model, z, r, t, v, y)
    if conditional:
        assert not torch.allclose(model(z, r, t), model(z, r, t, y=y))
        assert torch.equal(model(z, r, t), model(z, r, t, y=torch.full_like(y, 10)))


def test_dropout_in_train_mode_only():
    """Training mode: two calls differ (dropout masks); eval mode: the same function as the
    network with dropout 0 and the same weights, which differs from a training-mode call."""
    model = _tiny(dtype=torch.float32)
    z, r, t, _ = _inputs(dtype=torch.float32)
    assert not torch.equal(model(z, r, t), model(z, r, t))
    plain = _tiny(dtype=torch.float32, perturb=False, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    expected = plain(z, r, t)  # training mode, nothing to drop
    assert torch.equal(model.eval()(z, r, t), expected)
    assert not torch.allclose(model.train()(z, r, t), expected)


@pytest.mark.parametrize("conditional", [False, True])
def test_meanflow_objective_trains_through_songunet(conditional):
    """Without dropout: u, target (against a float64 central difference), loss and gradient
    recomputed apart from the objective; then every parameter gets a finite gradient."""
    model = _tiny(dtype=torch.float32, dropout=0.0, num_classes=10 if conditional else 0)
    x, _, _, noise = _inputs(dtype=torch.float32, seed=1)
    r, t = torch.tensor([0.1, 0.6, 0.0]), torch.tensor([0.3, 0.6, 0.9])
    y = torch.tensor([0, 3, 9]) if conditional else None
    out = MeanFlow()(model, x, y, noise=noise, r=r, t=t)
    assert_meanflow_output_is_the_formula(model, out, x, noise, r, t, y)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("case", ["name", "size", "attention", "groups", "shape"])
def test_bad_input_raises_meanflow_error(case):
    with pytest.raises(MeanFlowError):
        if case == "name":
            songunet("huge")
        elif case == "size":
            songunet("cifar10-paper", 3, 30)
        elif case == "attention":
            SongUNet(input_size=16, model_channels=8, channel_mult=(1,), num_blocks=1,
                     attention_resolutions=(4,))
        elif case == "groups":
            songunet("tiny", 3, 16, model_channels=34)
        else:
            _tiny(dtype=torch.float32)(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.ones(2))
