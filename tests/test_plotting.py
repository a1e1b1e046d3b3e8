"""The pictures say what they show: smoothing, short runs, dimensions of a scatter, class names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from meanflow import plotting
from meanflow.plotting import column_names, image_grid_png, loss_curve_png, scatter_png, smooth
from meanflow.train.pictures import write_loss_curve


def test_smooth_is_a_centred_rolling_median():
    x = [1.0, 2.0, 100.0, 4.0, 5.0, 6.0, 7.0]
    # the spike at index 2 disappears; the ends keep their values (the window shrinks to stay
    # centred), so a fast early drop is not delayed as an EMA would delay it
    assert smooth(x, 3).tolist() == [1.0, 2.0, 4.0, 5.0, 5.0, 6.0, 7.0]
    assert smooth(x, 5).tolist() == [1.0, 2.0, 4.0, 5.0, 6.0, 6.0, 7.0]
    assert smooth(x, 1).tolist() == x
    line = np.linspace(50.0, 4.0, 20)
    assert np.allclose(smooth(line, 7), line)  # no lag on a monotone trend


def _records(n, p_zero=False):
    rng = np.random.default_rng(0)
    mse = 50 * np.exp(-np.arange(n) / 5) + 4 + rng.uniform(0, 1, n)
    loss = mse if p_zero else mse / (mse + 1e-3) ** 0.75
    return [{"step": 50 * (i + 1), "loss": float(loss[i]), "mse": float(mse[i])}
            for i in range(n)]


def _captured_figure(monkeypatch):
    """Patch savefig to record the texts of the figure it writes."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seen = {}
    original = Figure.savefig

    def savefig(fig, path, **kw):
        seen["texts"] = [t.get_text() for t in fig.texts if t is not fig._suptitle]
        seen["axes"] = [(ax.get_title(), ax.get_yscale(), len(ax.lines)) for ax in fig.axes]
        return original(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


@pytest.mark.parametrize("n", [1, 2])
def test_short_run_writes_a_figure_that_says_so(n, tmp_path, monkeypatch):
    seen = _captured_figure(monkeypatch)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _records(n))
    out = write_loss_curve(str(tmp_path), "meanflow on x")
    assert out == str(tmp_path / "loss.png")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert seen["axes"] == []  # no empty axes
    assert len(seen["texts"]) == 1 and "run too short for a loss curve" in seen["texts"][0]
    assert f"({n} record" in seen["texts"][0] and f"step {50 * n}" in seen["texts"][0]


def test_no_records_no_loss_png(tmp_path):
    assert write_loss_curve(str(tmp_path)) is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert write_loss_curve(str(tmp_path)) is None
    assert not (tmp_path / "loss.png").exists()


def test_weighted_loss_gets_its_own_panel_and_the_note(tmp_path, monkeypatch):
    seen = _captured_figure(monkeypatch)
    loss_curve_png(str(tmp_path / "a.png"), _records(40), "t")
    (err_title, err_scale, err_lines), (loss_title, _, loss_lines) = seen["axes"]
    assert "unweighted" in err_title and "adaptively weighted" in loss_title
    assert err_scale == "log"  # the error falls by more than a factor 10
    assert err_lines == loss_lines == 2  # raw (faint) and smoothed (bold)
    [note] = seen["texts"]  # one footnote
    assert "does not fall like a regression loss" in note.replace("\n", " ")


def test_loss_equal_to_error_is_one_panel(tmp_path, monkeypatch):
    seen = _captured_figure(monkeypatch)
    loss_curve_png(str(tmp_path / "a.png"), _records(8, p_zero=True), "t")
    [(title, _, lines)] = seen["axes"]
    assert "= the loss" in title and lines == 1  # 8 records: markers, no smoothing


def test_vector_runs_plot_sample_quality_first_with_its_floor(tmp_path, monkeypatch):
    seen = _captured_figure(monkeypatch)
    records = _records(30, p_zero=True)
    for i, r in enumerate(records):
        r.update(swd_1step=2.0 / (i + 1) + 0.05, swd_floor=0.04)
    loss_curve_png(str(tmp_path / "a.png"), records, "t")
    (swd_title, swd_scale, swd_lines), (err_title, _, _) = seen["axes"]
    assert "sliced Wasserstein" in swd_title and "= the loss" in err_title
    assert swd_scale == "log" and swd_lines == 3  # raw, smoothed and the floor
    assert "first panel" in seen["texts"][0].replace("\n", " ")


def test_scatter_names_the_dimensions_it_shows(tmp_path, monkeypatch):
    seen = _captured_figure(monkeypatch)
    points = np.random.default_rng(0).normal(size=(100, 5))
    scatter_png(str(tmp_path / "s.png"), [("samples", points), ("plane", points[:, :2])])
    (five, _, _), (two, _, _) = seen["axes"]
    assert five == "samples\n(dims 0 and 1 of 5)" and two == "plane"


def test_labelled_grid_has_class_names_above_the_columns(tmp_path, monkeypatch):
    images = np.random.default_rng(0).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    labels = np.arange(6) % 3
    calls = []
    header = plotting.label_header
    monkeypatch.setattr(plotting, "label_header", lambda *a: calls.append(a) or header(*a))
    image_grid_png(str(tmp_path / "plain.png"), images, 3, scale=4)
    image_grid_png(str(tmp_path / "named.png"), images, 3, scale=4,
                   class_names=["cat", "dog", "fish"], labels=labels)
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "named.png") as b:
        plain, named = np.asarray(a), np.asarray(b)
    assert [c[0] for c in calls] == [["cat", "dog", "fish"]]
    assert named.shape[1] == plain.shape[1] and named.shape[0] > plain.shape[0]
    rows = named.shape[0] - plain.shape[0]
    assert np.array_equal(named[rows:], plain)  # the pixel grid is unchanged below the names
    assert (named[:rows] < 128).any()  # text was drawn
    # mixed columns get no name; no labels, no header
    assert column_names(3, ["a", "b"], [0, 1, 0, 0, 1, 1]) == ["a", "b", ""]
    assert column_names(2, None, [0, 1, 0, 1]) == ["0", "1"]
    assert column_names(2, ["a", "b"], None) is None
    assert column_names(2, ["a", "b"], [0, 1, 1, 0]) is None
