import math

import pytest
import torch
from conftest import SQRT_PI, logit

from meanflow import MeanFlowError, TimeSampler, linear_path


def test_linear_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.equal(linear_path(x, e, torch.zeros(5, dtype=torch.float64)).z, x)
    assert torch.equal(linear_path(x, e, torch.ones(5, dtype=torch.float64)).z, e)
    t, h = torch.rand(5, generator=g, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    fd = (linear_path(x, e, t + h).z - linear_path(x, e, t - h).z) / (2 * h)
    assert torch.allclose(fd, linear_path(x, e, t).v, atol=1e-8)
    assert torch.equal(linear_path(x, e, t).v, e - x)


def test_linear_path_broadcasts_over_image_dims():
    x, e = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    z = linear_path(x, e, torch.tensor([0.25, 0.75])).z
    assert torch.allclose(z[0], torch.full((1, 4, 4), 0.25))
    assert torch.allclose(z[1], torch.full((1, 4, 4), 0.75))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75, 1.0])
def test_time_sampler_ordering_and_fraction(ratio):
    n = 200_000
    r, t = TimeSampler(ratio=ratio)(n, generator=torch.Generator().manual_seed(1))
    assert r.shape == t.shape == (n,)
    assert bool(((0 <= r) & (r <= t) & (t <= 1)).all())
    frac = (r < t).double().mean().item()
    assert abs(frac - ratio) <= 4 * math.sqrt(ratio * (1 - ratio) / n) + 1e-12


def test_logit_normal_moments_are_order_statistics():
    """t = max, r = min of two N(m, s) draws in logit space: E = m +- s / sqrt(pi),
    Var = s^2 (1 - 1 / pi)."""
    m, s, n = -0.4, 1.0, 400_000
    r, t = TimeSampler(mean=m, std=s, ratio=1.0)(n, generator=torch.Generator().manual_seed(2))
    lt, lr = logit(t.double()), logit(r.double())
    tol = 4 * s / math.sqrt(n)
    assert abs(lt.mean().item() - (m + s / SQRT_PI)) < tol
    assert abs(lr.mean().item() - (m - s / SQRT_PI)) < tol
    assert abs(lt.var().item() - s ** 2 * (1 - 1 / math.pi)) < 0.01
    # the average of min and max is the average of the two draws: N(m, s^2 / 2)
    mid = (lt + lr) / 2
    assert abs(mid.mean().item() - m) < tol and abs(mid.var().item() - s ** 2 / 2) < 0.01


def test_separate_r_distribution_shifts_r_down():
    r, t = TimeSampler(mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=1.0)(
        100_000, generator=torch.Generator().manual_seed(3))
    base_r, _ = TimeSampler(mean=-0.6, std=1.6, ratio=1.0)(100_000, generator=torch.Generator().manual_seed(3))
    assert bool((r <= t).all())
    assert r.mean() < base_r.mean() - 0.1


def test_uniform_order_statistics():
    r, t = TimeSampler(dist="uniform", ratio=1.0)(200_000, generator=torch.Generator().manual_seed(4))
    assert abs(t.mean().item() - 2 / 3) < 0.005 and abs(r.mean().item() - 1 / 3) < 0.005


def test_time_sampler_is_reproducible_with_a_seed():
    a = TimeSampler()(64, generator=torch.Generator().manual_seed(5))
    b = TimeSampler()(64, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kwargs", [dict(ratio=1.5), dict(ratio=-0.1), dict(std=0.0),
                                    dict(r_std=-1.0), dict(dist="beta"),
                                    dict(mix=-0.1), dict(mix=1.5),
                                    dict(flat="min"), dict(ratio_start=1.5)])
def test_time_sampler_rejects_bad_settings(kwargs):
    with pytest.raises(MeanFlowError):
        TimeSampler(**kwargs)


def test_mix_rows_are_uniform_on_the_triangle():
    """With mix = 1 every row's two draws are U[0, 1], so (r, t) = (min, max) is uniform on the
    triangle r <= t: P(t - r >= d) = (1 - d)^2, P(r >= 1/2) = 1/4, E[t] = 2/3, E[r] = 1/3,
    whatever the logit-normal settings."""
    n = 200_000
    s = TimeSampler(mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=1.0, mix=1.0)
    r, t = s(n, generator=torch.Generator().manual_seed(6))
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(t.mean().item() - 2 / 3) < 0.005 and abs(r.mean().item() - 1 / 3) < 0.005
    assert abs((r >= 0.5).double().mean().item() - 0.25) < tol
    for d in (0.25, 0.5, 0.75):
        assert abs((t - r >= d).double().mean().item() - (1 - d) ** 2) < tol


def test_mix_is_a_per_row_mixture_of_the_two_laws():
    """P(r >= 1/2) under mix m is (1 - m) P_LN(r >= 1/2) + m / 4, with P_LN for the minimum of
    a ~ LN(-0.6, 1.6), b ~ LN(-4, 1.6): P(a >= 1/2) P(b >= 1/2) (the logit of 1/2 is 0)."""
    n, m = 400_000, 0.3
    norm = torch.distributions.Normal(0.0, 1.0)
    p_a, p_b = (1 - norm.cdf(torch.tensor(x / 1.6)).item() for x in (0.6, 4.0))
    expected = (1 - m) * p_a * p_b + m / 4
    s = TimeSampler(mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=1.0, mix=m)
    r, t = s(n, generator=torch.Generator().manual_seed(7))
    assert bool(((0 <= r) & (r <= t) & (t <= 1)).all())
    p = (r >= 0.5).double().mean().item()
    assert abs(p - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_mix_zero_draws_as_before():
    """mix = 0 adds no draws: the stream is a, b, then the r != t coin, as without mixing."""
    r, t = TimeSampler(mean=-0.6, std=1.6, ratio=0.75, mix=0.0)(
        64, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    a = torch.sigmoid(-0.6 + 1.6 * torch.randn(64, generator=g))
    b = torch.sigmoid(-0.6 + 1.6 * torch.randn(64, generator=g))
    distinct = torch.rand(64, generator=g) < 0.75
    assert torch.equal(t, torch.maximum(a, b))
    assert torch.equal(r, torch.where(distinct, torch.minimum(a, b), t))

@pytest.mark.parametrize("order", ["sorted", "official-v1"])
def test_flat_single_gives_the_r_equal_t_rows_the_t_law(order):
    """time.flat=single: the r = t rows' t is the first draw a ~ D_t (unmixed), so its logit
    is N(mean, std), while the max of two uniform draws (mix = 1) has mean 2/3; the r != t rows
    are the same as under flat=max (the same draws)."""
    n = 200_000
    kw = dict(mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=0.5, mix=1.0, order=order)
    r1, t1 = TimeSampler(**kw)(n, generator=torch.Generator().manual_seed(3))
    r2, t2 = TimeSampler(**kw, flat="single")(n, generator=torch.Generator().manual_seed(3))
    d1, d2 = r1 < t1, r2 < t2
    assert torch.equal(d1, d2) and torch.equal(t1[d1], t2[d2]) and torch.equal(r1[d1], r2[d2])
    flat = torch.logit(t2[~d2].double())
    m = flat.numel()
    assert abs(flat.mean().item() + 0.6) < 4 * 1.6 / math.sqrt(m)
    assert abs(flat.std().item() - 1.6) < 0.02
    if order == "sorted":  # flat=max there: t = max of two uniforms
        assert abs(t1[~d1].double().mean().item() - 2 / 3) < 0.01


def test_ratio_schedule_moves_the_r_neq_t_share_linearly():
    """time.ratio_start: the share of r != t rows goes from ratio_start at the first step to
    ratio at the last; an objective draws from the sampler of the step the trainer names."""
    from meanflow import MeanFlow

    s = TimeSampler(ratio=0.75, ratio_start=0.25)
    assert [s.at(k, 101).ratio for k in (0, 50, 100)] == [0.25, 0.5, 0.75]
    plain = TimeSampler(ratio=0.75)
    assert plain.at(50, 101) is plain
    assert TimeSampler(ratio=0.0, ratio_start=0.25).at(0, 101).ratio == 0.0  # never above
    obj, n = MeanFlow(s), 100_000
    for step, share in ((0, 0.25), (100, 0.75)):
        obj.at_step(step, 101)
        d = obj.draw(n, (2,), generator=torch.Generator().manual_seed(step))
        r, t = d.r, d.t
        assert abs((r < t).double().mean().item() - share) < 4 * math.sqrt(0.25 / n)
    assert obj.time_schedule is s and s.ratio == 0.75  # the configured sampler is not changed


@pytest.mark.parametrize("pair", [(0.0, 1.0), (0.5, 1.0), (0.0, 0.5), (0.75, 1.0), (0.25, 0.5)])
def test_toy_2d_preset_trains_the_k_step_pairs(pair):
    """The (r, t) pairs of the 1-, 2- and 4-step samplers (uniform schedules 1 -> 0) each get a
    share of the toy-2d preset's rows near them at every step: within 0.05 in r and t, at least
    half of what the uniform triangle law (density 2 on 0 <= r <= t <= 1) gives the rows that
    are r != t and mixed (``ratio * mix`` of them, at the first step's smallest ratio)."""
    from meanflow.train import TrainConfig
    from meanflow.config.presets import configure

    cfg = configure(TrainConfig(), "toy-2d")
    sampler = cfg.time.at(0, cfg.steps)  # the first step: the smallest r != t share
    n, h = 400_000, 0.05
    r, t = sampler(n, generator=torch.Generator().manual_seed(9))
    near = ((r - pair[0]).abs() <= h) & ((t - pair[1]).abs() <= h) & (r < t)
    # the uniform triangle's mass in that window: 2 x its area inside the triangle
    lo_r, hi_r = max(pair[0] - h, 0.0), pair[0] + h
    lo_t, hi_t = pair[1] - h, min(pair[1] + h, 1.0)
    area = (hi_r - lo_r) * (hi_t - lo_t) if hi_r <= lo_t else (hi_r - lo_r) * (hi_t - lo_t) / 2
    assert near.double().mean().item() >= 0.5 * sampler.ratio * sampler.mix * 2 * area
