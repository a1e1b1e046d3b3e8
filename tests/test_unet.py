import pytest
import torch
from conftest import (
    assert_meanflow_output_is_the_formula,
    assert_total_derivative_matches_fd,
)

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


def _closed_form_count(name, channels, size, num_classes=0):
    """The parameter count of the layout the module docstring describes, added up by hand:
    Conv k x k (k^2 cin cout + cout), Linear (a b + b), GroupNorm (2c); ResBlock = GN, Conv3x3,
    Linear(E, 2 cout) scale-shift, GN, Conv3x3 (+ 1x1 skip when the width changes); attention =
    GN, 1x1 qkv, 1x1 proj; two timestep embedders Linear(256, E)-Linear(E, E), E = 4 base; a
    label table of num_classes + 1 rows."""
    cfg = UNET_CONFIGS[name]
    base, mult, blocks = cfg["base_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    emb = 4 * base

    def conv(a, b, k=3):
        return k * k * a * b + b

    def lin(a, b):
        return a * b + b

    def res(a, b):
        skip = conv(a, b, 1) if a != b else 0
        return 2 * a + conv(a, b) + lin(emb, 2 * b) + 2 * b + conv(b, b) + skip

    def attn(c):
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    attention_sizes = {size // d for d in cfg["attention_downsample"]}
    widths = [base * m for m in mult]
    sizes = [size // 2 ** i for i in range(len(mult))]
    n = 2 * (lin(256, emb) + lin(emb, emb)) + (num_classes + 1) * emb * (num_classes > 0)
    ch = widths[0]
    n += conv(channels, ch)
    skips = [ch]
    for level, width in enumerate(widths):
        for _ in range(blocks):
            n += res(ch, width) + attn(width) * (sizes[level] in attention_sizes)
            ch = width
            skips.append(ch)
        if level < len(widths) - 1:
            n += conv(ch, ch)
            skips.append(ch)
    n += 2 * res(ch, ch) + attn(ch)
    for level in reversed(range(len(widths))):
        for i in range(blocks + 1):
            n += res(ch + skips.pop(), widths[level])
            ch = widths[level]
            n += attn(ch) * (sizes[level] in attention_sizes)
            n += conv(ch, ch) * (level > 0 and i == blocks)
    return n + 2 * ch + conv(ch, channels)


@pytest.mark.parametrize("name, channels, size", [("tiny", 1, 28), ("small", 1, 28),
                                                  ("small", 3, 32), ("cifar10-paper", 3, 32)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_parameter_counts_match_the_closed_form(name, channels, size, num_classes):
    assert _count(name, channels, size, num_classes) == _closed_form_count(
        name, channels, size, num_classes)


def test_parameter_counts_match_the_documented_sizes():
    """The module docstring: "small" 1.8M at 28x28x1, "cifar10-paper" 58.5M at 32x32x3."""
    assert round(_count("small", 1, 28) / 1e6, 1) == 1.8
    assert round(_count("cifar10-paper", 3, 32) / 1e6, 1) == 58.5
    # a label table adds exactly (num_classes + 1) rows of width 4 * base_channels
    assert _count("small", 1, 28, num_classes=10) - _count("small", 1, 28) == 11 * 4 * 32


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_exact_zero_at_init(channels):
    model = _tiny(channels, dtype=torch.float32, perturb=False)
    z, r, t, _, y = _inputs(channels, dtype=torch.float32)
    for labels in (y, None):
        u = model(z, r, t, y=labels)
        assert u.shape == z.shape and u.dtype == z.dtype
        assert torch.equal(u, torch.zeros_like(z))


def _block_input_sizes(model, z):
    """The (H, W) that each AttentionBlock and each Downsample of ``model`` sees in a forward."""
    seen = {"AttentionBlock": [], "Downsample": [], "Upsample": []}
    hooks = [m.register_forward_hook(lambda m, args, out: seen[type(m).__name__].append(
        (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))))
        for m in model.modules() if type(m).__name__ in seen]
    try:
        u = model(z, torch.zeros(z.shape[0]), torch.ones(z.shape[0]))
    finally:
        for h in hooks:
            h.remove()
    return u, seen


def test_attention_and_levels_are_where_the_config_says():
    model = unet("small", 1, 28)
    u, seen = _block_input_sizes(model, torch.randn(2, 1, 28, 28))
    # attention at 28 // 4 = 7 only: 2 blocks down + 3 up at 7x7, one in the middle (also 7x7)
    assert [i for i, _ in seen["AttentionBlock"]] == [(7, 7)] * (2 + 3 + 1)
    assert all(i == o for i, o in seen["AttentionBlock"])  # residual: the size is kept
    # three levels: 28 -> 14 -> 7 by stride-2 convs, 7 -> 14 -> 28 by nearest x2
    assert seen["Downsample"] == [((28, 28), (14, 14)), ((14, 14), (7, 7))]
    assert seen["Upsample"] == [((7, 7), (14, 14)), ((14, 14), (28, 28))]
    assert u.shape == (2, 1, 28, 28)
    odd = UNet(in_channels=2, input_size=12, base_channels=8, channel_mult=(1, 1, 2),
               num_res_blocks=1, attention_resolutions=(3,), groups=4)
    u, seen = _block_input_sizes(odd, torch.randn(1, 2, 12, 12))
    # one block down at 3x3, two up, one in the middle
    assert [i for i, _ in seen["AttentionBlock"]] == [(3, 3)] * (1 + 2 + 1)
    assert seen["Downsample"] == [((12, 12), (6, 6)), ((6, 6), (3, 3))]
    assert u.shape == (1, 2, 12, 12)


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
    labels = y if conditional else None
    t = torch.tensor([0.3, 0.6, 0.9, 0.5])
    r = torch.tensor([0.1, 0.6, 0.2, 0.0])  # one sample with r == t, three with r < t
    out = MeanFlow()(model, x, labels, noise=noise, r=r, t=t)
    # the r == t row regresses on v = e - x exactly; the loss is the mean of err / (err + c)
    assert torch.equal(out.target[1], (noise - x)[1])
    err = (out.u.detach() - out.target).pow(2).flatten(1).sum(dim=1)
    torch.testing.assert_close(out.err, err)
    torch.testing.assert_close(out.loss.detach(), (err / (err + 1e-3)).mean())
    # dropout really acted in this training-mode call: the eval-mode network differs
    with torch.no_grad():
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        plain = model.eval()(z, r, t, labels)
    model.train()
    assert not torch.allclose(out.u.detach(), plain, atol=1e-3)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("label"):  # only the rows of the labels present get gradient
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("jvp", ["subset", "full"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("conditional", [True, False])
def test_meanflow_objective_through_unet_is_the_formula(channels, conditional, jvp):
    """Without dropout: u, target (against a float64 central difference), loss and gradient
    recomputed independently of the objective."""
    model = _tiny(channels, dtype=torch.float32, num_classes=10 if conditional else 0,
                  dropout=0.0)
    x, _, _, noise, y = _inputs(channels, dtype=torch.float32, seed=1)
    t = torch.tensor([0.3, 0.6, 0.9, 0.5])
    r = torch.tensor([0.1, 0.6, 0.2, 0.0])
    labels = y if conditional else None
    out = MeanFlow(jvp=jvp)(model, x, labels, noise=noise, r=r, t=t)
    assert_meanflow_output_is_the_formula(model, out, x, noise, r, t, labels)


def test_missing_label_uses_the_null_row():
    model = _tiny().eval()  # no dropout masks
    z, r, t, _, y = _inputs()
    null = torch.full_like(y, 10)
    assert torch.equal(model(z, r, t), model(z, r, t, y=null))
    assert not torch.allclose(model(z, r, t), model(z, r, t, y=y))
    assert model.cond.label.weight.shape[0] == 11
    assert _tiny(num_classes=0).cond.label is None


def test_eval_mode_switches_dropout_off():
    """In training mode dropout makes two calls differ; in eval mode the network is the same
    function as one built with dropout 0 and the same weights (in either mode)."""
    model = _tiny(dropout=0.3)
    z, r, t, _, y = _inputs()
    assert not torch.allclose(model(z, r, t, y=y), model(z, r, t, y=y))
    plain = _tiny(dropout=0.0, perturb=False)
    plain.load_state_dict(model.state_dict())
    expected = plain(z, r, t, y=y)  # training mode, but nothing to drop
    assert torch.equal(model.eval()(z, r, t, y=y), expected)
    assert not torch.allclose(model.train()(z, r, t, y=y), expected)


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


def test_every_gradient_has_its_parameters_layout():
    """DDP copies (and warns about) a gradient whose strides differ from its parameter's: the
    one-head attention's output projection once got a channels-last weight gradient."""
    from meanflow.config import TrainConfig, build_model, configure

    torch.manual_seed(0)
    cfg = configure(TrainConfig(), "digits-small", [("model.channels", 8)])
    model = build_model(cfg, (1, 16, 16), 10)  # one-head attention at 4x4 and 8x8
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    MeanFlow()(model, x, y, generator=torch.Generator().manual_seed(0)).loss.backward()
    odd = [(n, tuple(p.stride()), tuple(p.grad.stride())) for n, p in model.named_parameters()
           if p.grad is not None and p.grad.stride() != p.stride()]
    assert any(p.grad is not None for p in model.parameters())
    assert not odd, odd
