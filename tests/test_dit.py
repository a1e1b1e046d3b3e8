import pytest
import torch
from conftest import assert_total_derivative_matches_fd

from meanflow import MeanFlow, MeanFlowError
from meanflow.nn import DIT_CONFIGS, DiT, dit


def _tiny(dtype=torch.float64, num_classes=10, perturb=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = dit("T/2", input_size=8, in_channels=4, num_classes=num_classes, **kw).to(dtype)
    if perturb:  # leave the adaLN-Zero init so that every path through the network matters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(b=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 8, 8, generator=g, dtype=dtype)
    v = torch.randn(b, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.8 + 0.15
    r = t * torch.rand(b, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (b,), generator=g)
    return z, r, t, v, y


@pytest.mark.parametrize("name, millions", [("B/2", 131), ("M/2", 308), ("L/2", 459),
                                            ("XL/2", 676)])
def test_parameter_counts_match_paper_table_2(name, millions):
    """MeanFlow Table 2 (32x32x4 latents, 1000 classes, two time embedders, no learn_sigma)."""
    with torch.device("meta"):
        model = dit(name, input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / (millions * 1e6) - 1) < 0.02, count
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in dict(model.named_parameters())


def test_output_shape_and_exact_zero_at_init():
    model = _tiny(dtype=torch.float32, perturb=False)
    z, r, t, _, y = _inputs(dtype=torch.float32)
    for labels in (y, None):
        u = model(z, r, t, y=labels)
        assert u.shape == z.shape and u.dtype == z.dtype
        assert torch.equal(u, torch.zeros_like(z))


def test_patch_layout_round_trips():
    """With the blocks and the final modulation switched off and the final Linear reading the
    patch pixels back (inverse of the patchify conv), the network returns z: patchify, token
    order and unpatchify agree."""
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, patch=2, hidden=12, depth=1, heads=2,
                num_classes=0).double()
    model.pos_embed.zero_()
    model.final.norm = torch.nn.Identity()
    with torch.no_grad():
        w = torch.eye(12, dtype=torch.float64)          # channel k <-> (c, i, j) pixel of the patch
        model.patchify.weight.copy_(w.reshape(12, 3, 2, 2))
        model.patchify.bias.zero_()
        # the Linear output is ordered (i, j, c); the conv weight flattens as (c, i, j)
        model.final.linear.weight.copy_(w.reshape(3, 2, 2, 12).permute(1, 2, 0, 3).reshape(12, 12))
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    r = t = torch.full((2,), 0.5, dtype=torch.float64)
    assert torch.allclose(model(z, r, t), z)


@pytest.mark.parametrize("conditional", [True, False])
def test_jvp_matches_central_finite_difference(conditional):
    model = _tiny(num_classes=10 if conditional else 0)
    z, r, t, v, y = _inputs()
    assert_total_derivative_matches_fd(model, z, r, t, v, y if conditional else None)


@pytest.mark.parametrize("jvp", ["subset", "full"])
@pytest.mark.parametrize("conditional", [True, False])
def test_meanflow_objective_trains_through_dit(conditional, jvp):
    model = _tiny(dtype=torch.float32, num_classes=10 if conditional else 0)
    x, _, _, noise, y = _inputs(dtype=torch.float32, seed=1)
    t = torch.tensor([0.3, 0.6, 0.9, 0.5])
    r = torch.tensor([0.1, 0.6, 0.2, 0.0])  # one sample with r == t, three with r < t
    out = MeanFlow(jvp=jvp)(model, x, y if conditional else None, noise=noise, r=r, t=t)
    assert out.u.shape == x.shape and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_missing_label_uses_the_null_row():
    model = _tiny()
    z, r, t, _, y = _inputs()
    null = torch.full_like(y, 10)
    assert torch.equal(model(z, r, t), model(z, r, t, y=null))
    assert not torch.allclose(model(z, r, t), model(z, r, t, y=y))
    assert model.cond.label.weight.shape == (11, DIT_CONFIGS["T"]["hidden"])
    assert _tiny(num_classes=0).cond.label is None


@pytest.mark.parametrize("case", ["odd_size", "bad_input_size", "channels", "spatial", "name",
                                  "patch_text", "patch_clash", "heads", "times"])
def test_bad_input_raises_meanflow_error(case):
    z, r, t, _, _ = _inputs(dtype=torch.float32)
    with pytest.raises(MeanFlowError):
        if case == "odd_size":
            dit("T/2", input_size=7)
        elif case == "bad_input_size":
            dit("T/4", input_size=6)
        elif case == "channels":
            _tiny(dtype=torch.float32)(torch.randn(4, 3, 8, 8), r, t)
        elif case == "spatial":
            _tiny(dtype=torch.float32)(torch.randn(4, 4, 7, 7), r, t)
        elif case == "name":
            dit("H/2")
        elif case == "patch_text":
            dit("B/x")
        elif case == "patch_clash":
            dit("B/2", patch=4)
        elif case == "heads":
            DiT(input_size=8, hidden=64, heads=5)
        elif case == "times":
            _tiny(dtype=torch.float32)(z, r[:3], t)
