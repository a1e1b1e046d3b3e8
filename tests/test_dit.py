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
from meanflow.nn import DIT_CONFIGS, DiT, dit


def _tiny(dtype=torch.float64, num_classes=10, perturb=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = dit("T/2", input_size=8, in_channels=4, num_classes=num_classes, **kw).to(dtype)
    return perturbed(model) if perturb else model


def _inputs(b=4, dtype=torch.float64, seed=0):
    z, r, t, v, g = jvp_inputs((4, 8, 8), b, dtype, seed)
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
    labels = y if conditional else None
    out = MeanFlow(jvp=jvp)(model, x, labels, noise=noise, r=r, t=t)
    # u, target (against a float64 central difference), loss and gradient recomputed apart
    assert_meanflow_output_is_the_formula(model, out, x, noise, r, t, labels)
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


def test_pos_embed_values_follow_the_authors_column_then_row_order():
    """The authors' DiT (models/models_dit.py, get_2d_sincos_pos_embed from MAE): for token
    p = i * G + j (row-major over (row i, column j)), channels [0, D/2) embed the column j and
    [D/2, D) the row i, each as [sin(x w_k), cos(x w_k)] with w_k = 1 / 10000^(2k / (D/2))."""
    from meanflow.nn.dit import sincos_2d

    grid, dim = 4, 16
    emb = sincos_2d(dim, grid).double()
    half, quarter = dim // 2, dim // 4
    assert emb.shape == (grid * grid, dim)
    for i in range(grid):
        for j in range(grid):
            p = i * grid + j
            for k in range(quarter):
                w = 1.0 / 10000 ** (2 * k / half)
                assert emb[p, k] == pytest.approx(math.sin(j * w), abs=1e-6)
                assert emb[p, quarter + k] == pytest.approx(math.cos(j * w), abs=1e-6)
                assert emb[p, half + k] == pytest.approx(math.sin(i * w), abs=1e-6)
                assert emb[p, half + quarter + k] == pytest.approx(math.cos(i * w), abs=1e-6)
    # patch (0, 1) moves along the first half, patch (1, 0) along the second
    p01, p10, p00 = emb[1], emb[grid], emb[0]
    assert not torch.allclose(p01[:half], p00[:half]) and torch.allclose(p01[half:], p00[half:])
    assert torch.allclose(p10[:half], p00[:half]) and not torch.allclose(p10[half:], p00[half:])
    assert torch.equal(_tiny(perturb=False).pos_embed, sincos_2d(64, 4).double())
