import math

import numpy as np
import pytest
import torch

from meanflow import MeanFlowError
from meanflow.data import TOY_DATASETS, load_vectors
from meanflow.eval import energy_distance, sliced_wasserstein


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_toy_datasets_seeded_finite(name):
    a, b = load_vectors(name, num=1000, seed=3), load_vectors(name, num=1000, seed=3)
    assert a.shape == (1000, 2) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.isfinite(a).all()
    assert not np.array_equal(a, load_vectors(name, num=1000, seed=4))


def test_toy_geometry():
    cb = load_vectors("checkerboard", num=20_000)
    cells = np.floor((cb + 4) / 2).astype(int)
    assert ((cells.sum(axis=1)) % 2 == 0).all() and (np.abs(cb) <= 4).all()
    g8 = load_vectors("eight-gaussians", num=20_000)
    angles = np.arange(8) * np.pi / 4
    centers = 4 * np.stack([np.cos(angles), np.sin(angles)], 1)
    nearest = np.linalg.norm(g8[:, None] - centers[None], axis=2).min(axis=1)
    assert abs(np.mean(nearest ** 2) - 2 * 0.25) < 0.03  # E|N(0, 0.25 I_2)|^2 = 0.5
    radii = np.linalg.norm(load_vectors("rings", num=20_000), axis=1)
    assert np.abs(radii - np.clip(np.round(radii), 1, 4)).mean() < 0.1


def test_user_arrays(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, labels=np.arange(50))
    np.savez(tmp_path / "c.npz", x.astype(np.int64))
    assert np.allclose(load_vectors(str(tmp_path / "a.npy")), x.astype(np.float32))
    assert np.allclose(load_vectors(str(tmp_path / "b.npz")), x.astype(np.float32))
    assert load_vectors(str(tmp_path / "c.npz")).dtype == np.float32


def _bad_file(tmp_path, case):
    path = tmp_path / ("bad.npz" if case in ("npz_keys", "npz_empty") else "bad.npy")
    x = np.ones((10, 2))
    if case == "rank3":
        np.save(path, np.ones((4, 2, 2)))
    elif case == "rank1":
        np.save(path, np.ones(5))
    elif case == "nan":
        x[3, 1] = np.nan
        np.save(path, x)
    elif case == "inf":
        x[0, 0] = np.inf
        np.save(path, x)
    elif case == "empty":
        np.save(path, np.ones((0, 2)))
    elif case == "object":
        np.save(path, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    elif case == "strings":
        np.save(path, np.array([["a", "b"]]))
    elif case == "corrupt":
        path.write_bytes(b"not a numpy file at all")
    elif case == "npz_keys":
        np.savez(path, a=x, b=x)
    elif case == "npz_empty":
        np.savez(path)
    elif case == "missing":
        path = tmp_path / "missing.npy"
    return str(path)


@pytest.mark.parametrize("case", ["rank3", "rank1", "nan", "inf", "empty", "object", "strings",
                                  "corrupt", "npz_keys", "npz_empty", "missing"])
def test_bad_arrays_raise_one_clear_error(tmp_path, case):
    with pytest.raises(MeanFlowError) as info:
        load_vectors(_bad_file(tmp_path, case))
    assert "\n" not in str(info.value)


def test_unknown_dataset_suggests_closest():
    with pytest.raises(MeanFlowError, match="checkerboard"):
        load_vectors("checkerbord")


def test_swd_closed_form_for_a_shift():
    """Shifting by m: each projection differs by <w, m>, so SWD^2 = E<w, m>^2 = |m|^2 / D."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 4))  # x + m has exactly shifted quantiles: no sampling error
    m = np.array([1.0, -2.0, 0.5, 0.0])
    assert sliced_wasserstein(x, x) == 0.0
    swd = sliced_wasserstein(x, x + m, projections=4000)
    assert abs(swd - np.linalg.norm(m) / 2) < 0.03


def test_swd_unequal_sizes_and_dimension_check():
    rng = np.random.default_rng(1)
    assert sliced_wasserstein(rng.normal(size=(3000, 2)), rng.normal(size=(2000, 2))) < 0.08
    with pytest.raises(MeanFlowError):
        sliced_wasserstein(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(MeanFlowError):
        energy_distance(np.full((10, 2), np.nan), np.zeros((10, 2)))


def test_energy_distance_closed_form_1d():
    """X ~ N(0,1), Y ~ N(mu,1): E|X-Y| = 2 phi(mu/sqrt2) sqrt2 + mu (2 Phi(mu/sqrt2) - 1) with
    X - Y ~ N(-mu, 2), and E|X-X'| = 2/sqrt(pi)."""
    mu, n = 1.0, 6000
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(n, 1)), rng.normal(size=(n, 1)) + mu
    s = math.sqrt(2)
    phi = math.exp(-(mu / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + math.erf(mu / s / math.sqrt(2)))
    exy = s * 2 * phi + mu * (2 * Phi - 1)
    expected = 2 * exy - 2 * (2 / math.sqrt(math.pi))
    assert abs(energy_distance(x, y) - expected) < 0.03
    assert abs(energy_distance(x, rng.normal(size=(n, 1)))) < 0.01
    assert energy_distance(torch.tensor(x), torch.tensor(y)) > 0.3
