"""EDM's augmentation pipeline (meanflow.data.augment): identities, exact geometric cases,
probabilities, labels and reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from meanflow.data.augment import (
    LABEL_DIM,
    LABEL_NAMES,
    AugmentPipe,
    affine_resample,
    augment_config,
)
from meanflow.errors import MeanFlowError

ALL = dict(xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def images(n=8, c=3, h=16, w=16, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_p_zero_is_identity_with_zero_labels():
    x = images()
    y, labels = AugmentPipe(p=0.0, **ALL)(x, gen())
    assert torch.equal(y, x)
    assert labels.shape == (8, LABEL_DIM) and labels.dtype == torch.float32
    assert not labels.any()


def test_xflip_flips_exactly_the_labelled_images():
    x = images(n=64)
    y, labels = AugmentPipe(p=1.0, xflip=1)(x, gen(1))
    w = labels[:, 0]
    assert set(w.unique().tolist()) == {0.0, 1.0}  # both happen in 64 images
    assert not labels[:, 1:].any()
    flipped = w == 1
    assert torch.equal(y[flipped], x[flipped].flip(3))
    assert torch.equal(y[~flipped], x[~flipped])


def test_edm_xflip_multiplier_tosses_the_coin_for_every_image():
    # EDM's xflip=1e8: the flip fires for every image, so half of them are mirrored.
    n = 20000
    _, labels = AugmentPipe(p=0.12, xflip=1e8)(torch.zeros(n, 1, 2, 2), gen(2))
    frac = labels[:, 0].mean().item()
    assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / n)


def reflect(i, n):
    """Reflection without repeating the edge (torch's 'reflect' padding) of index i into [0, n)."""
    period = 2 * n - 2
    i = i % period
    return torch.where(i < n, i, period - i)


@pytest.mark.parametrize("dx,dy", [(3, -2), (-5, 4), (0, 7)])
def test_integer_translation_is_roll_and_reflect(dx, dy):
    n, c, h, w = 3, 2, 12, 16
    x = images(n, c, h, w)
    g_inv = torch.tensor([[1.0, 0, -dx], [0, 1, -dy], [0, 0, 1]]).expand(n, 3, 3)
    y = affine_resample(x, g_inv)
    rows = reflect(torch.arange(h) - dy, h)
    cols = reflect(torch.arange(w) - dx, w)
    expected = x[:, :, rows][:, :, :, cols]  # content moves by (+dx, +dy)
    assert (y - expected).abs().max() < 1e-5


def rotation(theta):
    c, s = theta.cos(), theta.sin()
    zero = torch.zeros_like(c)
    return torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1),
                        torch.tensor([0.0, 0, 1]).expand(len(theta), 3)], 1)


def test_quarter_turn_is_rot90_on_smooth_images():
    # EDM's resampler is exact for integer shifts only: its sym6 filter is not symmetric, so a
    # quarter turn of a smooth image matches torch.rot90 to ~2% (white noise: ~10%).
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((xx - 6) ** 2 + (yy - 9) ** 2) / 10)[None, None]
    for k, angle in ((1, math.pi / 2), (2, math.pi), (3, -math.pi / 2)):
        y = affine_resample(blob, rotation(torch.tensor([angle])))
        errors = [(y - torch.rot90(blob, j, dims=(2, 3))).abs().max().item() for j in range(4)]
        assert errors[k] < 0.04
        assert min(e for j, e in enumerate(errors) if j != k) > 0.5  # the turn goes the right way


def test_rotation_label_matches_the_rotation():
    # Only rotations, at p = 1: each image is turned by the angle its label (cos w - 1, sin w)
    # gives.
    x = images(6, 1, 16, 16)
    y, labels = AugmentPipe(p=1.0, rotate_frac=1)(x, gen(3))
    w = torch.atan2(labels[:, 4], labels[:, 3] + 1)
    g_inv = rotation(w)
    assert (y - affine_resample(x, g_inv)).abs().max() < 1e-4
    assert set(i for i in range(LABEL_DIM) if labels[:, i].any()) == {3, 4}


@pytest.mark.parametrize("name,cols", [("xflip", [0]), ("yflip", [1]), ("scale", [2]),
                                       ("rotate_frac", [3, 4]), ("aniso", [5, 6]),
                                       ("translate_frac", [7, 8])])
def test_each_transformation_fires_with_probability_p(name, cols):
    n, p = 20000, 0.3
    _, labels = AugmentPipe(p=p, **{name: 1})(torch.zeros(n, 1, 4, 4), gen(4))
    fired = labels[:, cols].ne(0).any(dim=1).float().mean().item()
    expect = p / 2 if name in ("xflip", "yflip") else p  # a fired flip mirrors on a fair coin
    assert abs(fired - expect) < 5 * math.sqrt(expect * (1 - expect) / n)
    others = [i for i in range(LABEL_DIM) if i not in cols]
    assert not labels[:, others].any()


def test_same_generator_state_same_output():
    x = images(16)
    pipe = AugmentPipe(p=0.5, **ALL)
    g = gen(5)
    state = g.get_state()
    y1, l1 = pipe(x, g)
    y2, l2 = pipe(x, g)  # generator advanced: different draws
    g.set_state(state)
    y3, l3 = pipe(x, g)
    assert torch.equal(y1, y3) and torch.equal(l1, l3)
    assert not torch.equal(l1, l2)
    torch.manual_seed(0)
    a = pipe(x, gen(6))
    torch.manual_seed(1)  # the global generator plays no part
    b = pipe(x, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_untouched_images_have_zero_labels_and_are_returned_exactly():
    x = images(64)
    y, labels = AugmentPipe(p=0.15, **ALL)(x, gen(7))
    untouched = ~labels.ne(0).any(dim=1)
    assert 0 < untouched.sum() < 64
    assert torch.equal(y[untouched], x[untouched])
    changed = (y - x).flatten(1).abs().amax(dim=1) > 0
    assert torch.equal(changed, ~untouched)


def test_presets():
    authors = augment_config("edm-cifar10")
    assert authors == dict(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1,
                           translate_frac=1)
    pipe = AugmentPipe(**authors)
    # the authors' network takes 6 labels: xflip, scale, aniso (2), translate (2)
    assert [LABEL_NAMES[i] for i in pipe.active_labels] == [
        "xflip", "scale", "aniso_cos", "aniso_sin", "translate_x", "translate_y"]
    assert len(AugmentPipe.from_config("edm-original").active_labels) == 9
    augment_config("edm-cifar10")["p"] = 1.0  # a fresh dict each time
    assert augment_config("edm-cifar10")["p"] == 0.12
    assert AugmentPipe(**pipe.config()).config() == pipe.config()
    y, labels = pipe(images(32, 3, 32, 32), gen(8))
    assert y.shape == (32, 3, 32, 32) and labels.shape == (32, 9)
    assert not labels[:, [1, 3, 4]].any()
    with pytest.raises(MeanFlowError, match="unknown augmentation"):
        augment_config("edm-cifar")


def test_bad_arguments():
    with pytest.raises(MeanFlowError):
        AugmentPipe(p=1.5)
    with pytest.raises(MeanFlowError):
        AugmentPipe(scale=-1)
    with pytest.raises(MeanFlowError):
        AugmentPipe()(torch.zeros(3, 8, 8), gen())


def test_dtype_is_kept():
    x = images(8).to(torch.bfloat16)
    y, labels = AugmentPipe(p=1.0, **ALL)(x, gen(9))
    assert y.dtype == torch.bfloat16 and labels.dtype == torch.float32
    assert y.float().isfinite().all()


def test_rows_of_a_global_batch_are_augmented_as_in_the_whole_batch():
    """Data-parallel training: rank k augments rows ``part`` of the global batch with the
    random numbers drawn for the whole batch, so each row gets the same transformation."""
    pipe = AugmentPipe(**{**augment_config("edm-cifar10"), "p": 0.5})
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole, labels = pipe(images, torch.Generator().manual_seed(1))
    for part in (slice(0, 4), slice(4, 8)):
        rows, row_labels = pipe(images[part], torch.Generator().manual_seed(1), total=8,
                                part=part)
        assert torch.equal(row_labels, labels[part])
        assert torch.allclose(rows, whole[part], atol=1e-5)
