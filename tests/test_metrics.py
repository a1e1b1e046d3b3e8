import itertools
import math

import numpy as np
import pytest
import torch

from meanflow import MeanFlowError
from meanflow.eval import (
    FeatureStats,
    default_bandwidths,
    density_coverage,
    fd_from_features,
    frechet_distance,
    mmd2,
    precision_recall,
)


def _rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("rotated", [False, True])
def test_fd_commuting_closed_form(d, rotated):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr((S1 S2)^1/2) = sum sqrt(a b), so
    FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(d)
    a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    q = _rotation(d, 10 + d) if rotated else np.eye(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert _rel(frechet_distance(mu1, s1, mu2, s2), expected) < 1e-6


def test_fd_non_commuting_2d_closed_form():
    """For 2x2 M with eigenvalues l1, l2 >= 0: tr(M^1/2) = sqrt(tr M + 2 sqrt(det M))."""
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.5, 2.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert _rel(frechet_distance(mu1, s1, mu2, s2), expected) < 1e-6


def test_fd_near_singular_and_singular():
    q = _rotation(3, 5)
    for tiny in (1e-12, 0.0):
        a, b = np.array([1.0, tiny, 4.0]), np.array([tiny, 9.0, 4.0])
        s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
        fd = frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
        expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
        assert math.isfinite(fd) and _rel(fd, expected) < 1e-6


def test_fd_zero_for_same_and_symmetric():
    mu = np.random.default_rng(0).normal(size=6)
    s1, s2 = _spd(6, 1), _spd(6, 2)
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-9
    fd12 = frechet_distance(mu, s1, mu + 1, s2)
    assert fd12 > 1 and abs(fd12 - frechet_distance(mu + 1, s2, mu, s1)) < 1e-9 * fd12
    assert frechet_distance(torch.tensor(mu), torch.tensor(s1), mu, s2) == pytest.approx(
        frechet_distance(mu, s1, mu, s2), rel=1e-12)


def test_feature_stats_streaming_matches_numpy(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 5)) * [1, 10, 0.1, 3, 1] + 1e3  # large offset: no cancellation
    stats = FeatureStats()
    start = 0
    for i, size in enumerate([1, 7, 0, 300, 2, 690]):
        chunk = x[start:start + size]
        stats.update(torch.tensor(chunk) if i % 2 else chunk.astype(np.float64))
        start += size
    assert stats.count == 1000 and stats.dim == 5
    assert np.allclose(stats.mean, x.mean(axis=0), rtol=1e-10, atol=0)
    ref = np.cov(x, rowvar=False)
    assert np.abs(stats.cov - ref).max() < 1e-10 * np.abs(ref).max()
    np.savez(tmp_path / "stats.npz", **stats.to_arrays())
    back = FeatureStats.from_arrays(**np.load(tmp_path / "stats.npz"))
    assert back.count == 1000 and np.array_equal(back.mean, stats.mean)
    assert np.allclose(back.cov, stats.cov, rtol=1e-14, atol=0)
    back.update(x[:10])  # a reloaded stats object keeps streaming
    assert np.allclose(back.cov, np.cov(np.concatenate([x, x[:10]]), rowvar=False), rtol=1e-10)


def test_fd_from_features_matches_gaussian_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -0.5, 0.2])
    s1, s2 = _spd(4, 5), np.diag([0.5, 1.0, 2.0, 3.0])
    a = rng.multivariate_normal(mu1, s1, size=20_000)
    b = rng.multivariate_normal(mu2, s2, size=20_000)
    expected = frechet_distance(mu1, s1, mu2, s2)
    assert abs(fd_from_features(a, b) - expected) < 0.05 * expected
    assert fd_from_features(a, a) < 1e-9


def test_fd_from_features_fewer_samples_than_dimensions():
    rng = np.random.default_rng(5)
    fd = fd_from_features(rng.normal(size=(5, 10)), rng.normal(size=(6, 10)))
    assert math.isfinite(fd) and fd > 0
    with pytest.raises(MeanFlowError, match="too few samples.*got 1.*--num"):
        fd_from_features(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))


def _modes(n_per, centres, rng, std=0.5):
    return np.concatenate([c + std * rng.normal(size=(n_per, 2)) for c in centres])


CENTRES = 20.0 * np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])


def test_precision_recall_identical_disjoint():
    x = np.random.default_rng(6).normal(size=(500, 2))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 100) == {"precision": 0.0, "recall": 0.0}
    wide = np.random.default_rng(7).normal(size=(300, 40))  # D > 32: matrix-product distances
    assert precision_recall(wide, wide) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(8)
    real = _modes(250, CENTRES, rng)
    assert precision_recall(real, real[:500]) == {"precision": 1.0, "recall": 0.5}  # subset
    fake = _modes(250, CENTRES[:2], rng)  # fresh samples from two of the four modes
    pr = precision_recall(real, fake)
    assert pr["precision"] > 0.9 and abs(pr["recall"] - 0.5) < 0.05


def test_density_coverage():
    rng = np.random.default_rng(9)
    x, k = rng.normal(size=(1000, 2)), 5
    dc = density_coverage(x, x, k=k)
    # identical sets: each point is in its own ball plus, summed over balls, k others per ball
    assert dc["coverage"] == 1.0 and abs(dc["density"] - (1 + 1 / k)) < 1e-12
    dc = density_coverage(x, rng.normal(size=(1000, 2)), k=k)  # independent, same law
    # E[density] = 1; E[coverage] = 1 - prod_{i=1..k} (N - i) / (N + M - i) (Naeem et al.)
    expected_cov = 1 - np.prod([(1000 - i) / (2000 - i) for i in range(1, k + 1)])
    assert abs(dc["density"] - 1) < 0.1 and abs(dc["coverage"] - expected_cov) < 0.03
    assert density_coverage(x, x + 100, k=k) == {"density": 0.0, "coverage": 0.0}


def test_blocked_computation_matches_one_block():
    rng = np.random.default_rng(10)
    real, fake = _modes(100, CENTRES, rng), _modes(80, CENTRES[:3], rng, std=0.8)
    for fn, k in ((precision_recall, 3), (density_coverage, 5)):
        assert fn(real, fake, k=k, batch_size=7) == fn(real, fake, k=k, batch_size=4096)


def test_mmd_gaussian_closed_form():
    """X ~ N(0, v I_d), Y ~ N(m, v I_d), one bandwidth s: with c = (s^2 / (s^2 + 2v))^(d/2),
    E k(X, X') = c and E k(X, Y) = c exp(-|m|^2 / (2 (s^2 + 2v))), so
    MMD^2 = 2 c (1 - exp(-|m|^2 / (2 (s^2 + 2v))))."""
    rng = np.random.default_rng(11)
    d, v, s, m = 2, 1.0, 1.5, np.array([1.0, 0.5])
    x, y = rng.normal(size=(1500, d)), rng.normal(size=(1500, d)) + m
    c = (s ** 2 / (s ** 2 + 2 * v)) ** (d / 2)
    expected = 2 * c * (1 - math.exp(-m @ m / (2 * (s ** 2 + 2 * v))))
    assert abs(mmd2(x, y, bandwidths=[s]) - expected) < 0.1 * expected


def test_mmd_null_shift_monotone_and_blocks():
    rng = np.random.default_rng(12)
    x, noise = rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2))
    assert abs(mmd2(x, noise)) < 0.005
    values = [mmd2(x, noise + [shift, 0], bandwidths=[0.5, 1, 2]) for shift in (0.25, 0.5, 1, 2)]
    assert values[0] > 0.01 and all(a < b for a, b in itertools.pairwise(values))
    assert mmd2(x, noise + [1, 0]) > 0.1  # default bandwidths
    x, y = x[:300], noise[:250]
    assert mmd2(x, y, 1.0, batch_size=13) == pytest.approx(mmd2(x, y, 1.0), abs=1e-12)


def test_mmd_default_bandwidths_are_the_scaled_median():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 1
    z = np.concatenate([x, y])
    dist = np.linalg.norm(z[:, None] - z[None], axis=2)[np.triu_indices(50, 1)]
    med = np.sort(dist)[(dist.size - 1) // 2]  # lower median
    assert np.allclose(default_bandwidths(x, y), [0.5 * med, med, 2 * med], rtol=1e-12)
    assert mmd2(x, y) == pytest.approx(mmd2(x, y, [0.5 * med, med, 2 * med]), rel=1e-12)


GOOD = np.random.default_rng(14).normal(size=(20, 3))
NAN = GOOD.copy()
NAN[2, 1] = np.nan

BAD = {
    "fd_dims": lambda: frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)),
    "fd_sigma_shape": lambda: frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)),
    "fd_nan": lambda: frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2)),
    "stats_rank": lambda: FeatureStats().update(np.zeros(5)),
    "stats_dim_change": lambda: FeatureStats().update(GOOD).update(np.zeros((4, 2))),
    "stats_nan": lambda: FeatureStats().update(NAN),
    "stats_cov_one": lambda: FeatureStats().update(GOOD[:1]).cov,
    "stats_mean_empty": lambda: FeatureStats().mean,
    "stats_strings": lambda: FeatureStats().update(np.array([["a", "b"]])),
    "stats_from_arrays": lambda: FeatureStats.from_arrays(np.zeros(3), np.eye(2), 10),
    "stats_from_count": lambda: FeatureStats.from_arrays(np.zeros(2), np.eye(2), 1),
    "fdf_dims": lambda: fd_from_features(GOOD, np.zeros((20, 4))),
    "fdf_empty": lambda: fd_from_features(np.zeros((0, 3)), GOOD),
    "pr_k_too_big": lambda: precision_recall(GOOD, GOOD[:3], k=3),
    "pr_k_zero": lambda: precision_recall(GOOD, GOOD, k=0),
    "pr_dims": lambda: precision_recall(GOOD, np.zeros((20, 2))),
    "pr_nan": lambda: precision_recall(NAN, GOOD),
    "pr_rank": lambda: precision_recall(GOOD[0], GOOD),
    "pr_strings": lambda: precision_recall(np.array([["a", "b"]]), GOOD),
    "pr_batch": lambda: precision_recall(GOOD, GOOD, batch_size=0),
    "dc_k_too_big": lambda: density_coverage(GOOD[:5], GOOD, k=5),
    "dc_inf": lambda: density_coverage(GOOD, np.full((4, 3), np.inf)),
    "mmd_few": lambda: mmd2(GOOD[:1], GOOD),
    "mmd_dims": lambda: mmd2(GOOD, np.zeros((20, 2))),
    "mmd_bandwidth_negative": lambda: mmd2(GOOD, GOOD, bandwidths=[1.0, -1.0]),
    "mmd_bandwidth_empty": lambda: mmd2(GOOD, GOOD, bandwidths=[]),
    "mmd_bandwidth_text": lambda: mmd2(GOOD, GOOD, bandwidths="wide"),
    "mmd_all_same": lambda: mmd2(np.ones((5, 2)), np.ones((5, 2))),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_one_clear_error(case):
    with pytest.raises(MeanFlowError) as info:
        BAD[case]()
    assert "\n" not in str(info.value)


def test_dimension_mismatch_names_both_dimensions():
    with pytest.raises(MeanFlowError, match="d=2.*d=3"):
        BAD["fd_dims"]()
    with pytest.raises(MeanFlowError, match="k=3 needs more than 3 points in fake, got 3"):
        BAD["pr_k_too_big"]()
