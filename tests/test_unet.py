import pytest
import torch
from conftest import assert_total_derivative_matches_fd

from meanflow import MeanFlow, MeanFlowError
from meanflow.nn import UNET_CONFIGS, UNet, unet

SHAPES = {1: (1, 28, 28), 3: (3, 32, 32)}


def _tiny(channels=1, dtype=torch.float64, num_classes=10, perturb=True, seed=0, **kw):
    torch.manual_seed(seed)
    size = SHAPES[channels][-1]
    model = unet("tiny", channels, size, num_classes=num_classes, **kw).to(dtype)
    if perturb:  # leave the zero init so that every path through the network matters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(channels=1, b=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, *SHAPES[channels], generator=g, dtype=dtype)
    v = torch.randn(b, *SHAPES[channels], generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.8 + 0.15
    r = t * torch.rand(b, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (b,), generator=g)
    return z, r, t, v, y


def _count(name, channels, size, num_classes=0):
    with torch.device("meta"):
        model = unet(name, channels, size, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    assert _count("small", 1, 28) < 4e6
    assert _count("small", 1, 28, num_classes=10) < 4e6
    assert 50e6 <= _count("cifar10-paper", 3, 32) <= 60e6
    assert 50e6 <= _count("cifar10-paper", 3, 32, num_classes=10) <= 60e6
    assert _count("tiny", 1, 28) < 5e5


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_exact_zero_at_init(channels):
    model = _tiny(channels, dtype=torch.float32, perturb=False)
    z, r, t, _, y = _inputs(channels, dtype=torch.float32)
    for labels in (y, None):
        u = model(z, r, t, y=labels)
        assert u.shape == z.shape and u.dtype == z.dtype
        assert torch.equal(u, torch.zeros_like(z))


def test_attention_and_levels_are_where_the_config_says():
    model = unet("small", 1, 28)
    attn = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    # 2 blocks down + 3 up at 7x7, one in the middle (also 7x7)
    assert len(attn) == 2 + 3 + 1
    assert model(torch.randn(2, 1, 28, 28), torch.zeros(2), torch.ones(2)).shape == (2, 1, 28, 28)
    odd = UNet(in_channels=2, input_size=12, base_channels=8, channel_mult=(1, 1, 2),
               num_res_blocks=1, attention_resolutions=(3,), groups=4)
    assert odd(torch.randn(1, 2, 12, 12), torch.zeros(1), torch.ones(1)).shape == (1, 2, 12, 12)


@pytest.mark.parametrize("conditional", [True, False])
def test_jvp_matches_central_finite_difference(conditional):
    model = _tiny(num_classes=10 if conditional else 0, dropout=0.0).eval()
    z, r, t, v, y = _inputs()
    assert_total_derivative_matches_fd(model, z, r, t, v, y if conditional else None)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("conditional", [True, False])
def test_meanflow_objective_trains_through_unet(channels, conditional):
    model = _tiny(channels, dtype=torch.float32, num_classes=10 if conditional else 0)
    assert model.training and UNET_CONFIGS["tiny"]["dropout"] > 0  # dropout inside the JVP
    x, _, _, noise, y = _inputs(channels, dtype=torch.float32, seed=1)
    t = torch.tensor([0.3, 0.6, 0.9, 0.5])
    r = torch.tensor([0.1, 0.6, 0.2, 0.0])  # one sample with r == t, three with r < t
    out = MeanFlow()(model, x, y if conditional else None, noise=noise, r=r, t=t)
    assert out.u.shape == x.shape and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("label"):  # only the rows of the labels present get gradient
            assert p.grad.abs().sum() > 0, name


def test_missing_label_uses_the_null_row():
    model = _tiny().eval()  # no dropout masks
    z, r, t, _, y = _inputs()
    null = torch.full_like(y, 10)
    assert torch.equal(model(z, r, t), model(z, r, t, y=null))
    assert not torch.allclose(model(z, r, t), model(z, r, t, y=y))
    assert model.cond.label.weight.shape[0] == 11
    assert _tiny(num_classes=0).cond.label is None
    assert torch.equal(model(z, r, t), model(z, r, t))


@pytest.mark.parametrize("case", ["not_divisible", "channels", "spatial", "name", "groups",
                                  "attention", "times", "labels"])
def test_bad_input_raises_meanflow_error(case):
    z, r, t, _, y = _inputs(dtype=torch.float32)
    with pytest.raises(MeanFlowError):
        if case == "not_divisible":
            unet("small", 1, 30)  # three levels need a multiple of 4
        elif case == "channels":
            _tiny(dtype=torch.float32)(torch.randn(4, 3, 28, 28), r, t)
        elif case == "spatial":
            _tiny(dtype=torch.float32)(torch.randn(4, 1, 32, 32), r, t)
        elif case == "name":
            unet("huge", 3, 32)
        elif case == "groups":
            unet("tiny", 1, 28, groups=5)
        elif case == "attention":
            unet("tiny", 1, 28, attention_resolutions=(16,))
        elif case == "times":
            _tiny(dtype=torch.float32)(z, r[:3], t)
        elif case == "labels":
            _tiny(dtype=torch.float32)(z, r, t, y=y[:2])
