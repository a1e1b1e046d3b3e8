"""``model.z_features``: the MLP's Fourier features of ``z``, ``[z, sin(2^k z), cos(2^k z)]``."""

import math

import pytest
import torch

from meanflow.config import TrainConfig, build_model
from meanflow.errors import MeanFlowError
from meanflow.flow.jvp import total_derivative
from meanflow.nn.mlp import MLP


def test_encoding_by_hand():
    m = MLP(2, hidden=8, depth=1, z_features=3)
    z = torch.tensor([[0.5, -1.0]])
    enc = m.encode(z)
    angles = [0.5, 1.0, 2.0, -1.0, -2.0, -4.0]  # coordinate-major, frequencies 1, 2, 4
    expected = [0.5, -1.0] + [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    assert torch.allclose(enc, torch.tensor([expected]), atol=1e-6)
    assert MLP(2, hidden=8, depth=1).encode(z) is z  # none: z itself


@pytest.mark.parametrize("backend", ["forward-ad", "func"])
def test_jvp_through_the_features_matches_finite_differences(backend):
    torch.manual_seed(0)
    m = MLP(2, hidden=32, depth=3, z_features=4, time_input="t,r").double()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64)
    r = t * torch.rand(16, generator=g, dtype=torch.float64)
    v = torch.randn(16, 2, generator=g, dtype=torch.float64)
    u, dudt = total_derivative(m, z, r, t, v, None, backend=backend)
    h = 1e-6
    fd = (m(z + h * v, r, t + h) - m(z - h * v, r, t - h)) / (2 * h)
    assert torch.allclose(u, m(z, r, t))
    assert torch.allclose(dudt, fd, atol=1e-7)


def test_config_builds_the_features_and_refuses_them_elsewhere():
    cfg = TrainConfig()
    cfg.model.z_features = 4
    cfg.validate()
    model = build_model(cfg, (3,), 0)
    assert model.inp.in_features == 3 * 9 + model.time.out_dim
    cfg.model.arch = "unet"
    with pytest.raises(MeanFlowError, match="model.z_features is the mlp's"):
        cfg.validate()
    with pytest.raises(MeanFlowError, match="z_features must be >= 0"):
        MLP(2, z_features=-1)
