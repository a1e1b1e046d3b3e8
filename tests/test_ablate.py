"""meanflow ablate: studies train one run per setting, evaluate each through meanflow eval, reuse
finished settings, and write tables; the JVP tangent ablation computes what it names."""

import csv
import json

import pytest
import torch

from meanflow import MeanFlow
from meanflow.cli import main
from meanflow.train import ablation
from meanflow.train.ablation import STUDIES, Study, _ordering


def test_every_study_builds_valid_configs():
    from meanflow.train import TrainConfig, configure

    for name, s in STUDIES.items():
        assert s.default in s.settings or s.default == "", name
        assert set(s.paper) <= set(s.settings), name
        for overrides in s.settings.values():
            configure(TrainConfig(), "tiny", overrides).validate()


def test_paper_figures_are_the_published_ones():
    """MeanFlow Table 1 (1-NFE FID, ImageNet 256, B/4, 80 epochs), as listed in the issue."""
    assert STUDIES["ratio"].paper == {"0%": 328.91, "25%": 61.06, "50%": 63.14, "100%": 67.32}
    assert STUDIES["tangent"].paper == {"(v,0,1)": 61.06, "(v,0,0)": 268.06,
                                        "(v,1,0)": 329.22, "(v,1,1)": 137.96}
    assert STUDIES["p"].paper == {"0.0": 79.75, "0.5": 63.98, "1.0": 61.06, "1.5": 66.57,
                                  "2.0": 69.19}
    # Table 1f: omega alone (kappa = 0, the paper's Eq. before its appendix adds kappa)
    assert STUDIES["omega"].paper == {"1.0": 61.06, "3.0": 15.53}
    for label, overrides in STUDIES["omega"].settings.items():
        assert dict(overrides) == {"guidance.omega": float(label), "guidance.kappa": 0.0}


@pytest.mark.parametrize("tangent,dr,dt", [("v,0,0", 0.0, 0.0), ("v,1,0", 1.0, 0.0),
                                           ("v,1,1", 1.0, 1.0)])
def test_tangent_ablation_differentiates_along_what_it_names(tangent, dr, dt):
    from meanflow.config.build import build_objective
    from meanflow.train import TrainConfig, configure

    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3).double()

    def model(z, r, t, y=None):
        return torch.tanh(net(torch.cat([z, r[:, None], t[:, None] ** 2], 1)))

    cfg = configure(TrainConfig(), "tiny", [("loss.tangent", tangent)])
    obj = build_objective(cfg)
    z, v = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    r, t = torch.full((8,), 0.2, dtype=torch.float64), torch.full((8,), 0.7, dtype=torch.float64)
    _, dudt = torch.func.jvp(model, (z, r, t), (v, torch.full_like(r, dr), torch.full_like(t, dt)))
    _, target = obj.prediction_and_target(model, z, r, t, v, None)
    assert torch.allclose(target, v - 0.5 * dudt, atol=1e-12)
    _, default = MeanFlow().prediction_and_target(model, z, r, t, v, None)
    assert not torch.allclose(target, default, atol=1e-6)


def test_ordering_sentence():
    rows = [{"setting": "a", "1-step": 0.2, "paper_fid": 10.0},
            {"setting": "b", "1-step": 0.1, "paper_fid": 20.0},
            {"setting": "c", "1-step": 0.3, "paper_fid": None}]
    assert "differs from" in _ordering(rows) and "ours (1-step): b, a" in _ordering(rows)
    rows[0]["1-step"] = 0.05
    assert "matches" in _ordering(rows)
    assert _ordering(rows[:1]) == ""


def test_a_study_runs_end_to_end_and_reuses_finished_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(STUDIES, "mini", Study(
        "two fractions", {"0%": [("time.ratio", 0.0)], "50%": [("time.ratio", 0.5)]},
        {"0%": 300.0, "50%": 60.0}, "50%"))
    out = tmp_path / "abl"
    argv = ["ablate", "--study", "mini", "--data", "checkerboard", "--preset", "tiny",
            "--steps", "20", "--out", str(out), "--num", "300", "--quiet", "--threads", "1"]
    import meanflow.cli as cmd  # the parser's choices were fixed before the patch
    monkeypatch.setattr(cmd, "add_ablate_parser", _parser_with("mini", cmd.add_ablate_parser))
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert "| 50% (paper's choice) |" in table and "Best to worst" in table
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["setting"] for r in rows] == ["0%", "50%"] and rows[0]["metric"] == "swd"
    assert all(float(r["1-step"]) > 0 for r in rows) and (out / "plot.png").stat().st_size
    first = json.loads((out / "runs" / "50" / "ablation-eval.json").read_text())
    capsys.readouterr()
    assert main(argv) == 0  # a rerun reuses both settings: nothing is trained again
    log = capsys.readouterr()
    assert log.err.count("reused") == 2 and "training" not in log.err
    assert log.out == table
    again = json.loads((out / "runs" / "50" / "ablation-eval.json").read_text())
    assert again == first


def _parser_with(extra, original):
    def add(sub):
        original(sub)
        for action in sub.choices["ablate"]._actions:
            if action.dest == "study":
                action.choices = [*action.choices, extra]
    return add


def test_time_input_is_refused_on_image_networks():
    from meanflow.config.build import build_model
    from meanflow.errors import MeanFlowError
    from meanflow.train import TrainConfig, configure

    cfg = configure(TrainConfig(), "unet-small", [("model.time_input", "t,r")])
    with pytest.raises(MeanFlowError, match="MLP option"):
        build_model(cfg, (1, 16, 16))


def test_a_study_stops_when_a_signal_stops_its_training(tmp_path, monkeypatch):
    """SIGTERM makes train() save and return early; the study must not evaluate that run as
    finished and go on to the next setting."""
    from meanflow.errors import MeanFlowError
    from meanflow.train import loop

    def stopped(cfg, run_dir, **kw):
        return loop.TrainResult(run_dir, 7, 1.0, 0.1, 0, stopped_by="SIGTERM")

    monkeypatch.setattr(loop, "train", stopped)
    with pytest.raises(MeanFlowError, match="stopped by SIGTERM at step 7"):
        ablation.run_study("ratio", [("data", "checkerboard"), ("steps", 10)], str(tmp_path),
                           preset="tiny", reference="checkerboard", log=lambda m: None)
    assert not list(tmp_path.glob("runs/*/ablation-eval.json"))
