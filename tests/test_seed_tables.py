"""The quality tables over seeds (benchmarks/image_seeds_table.py) and the reuse of a seed
folder's rows (benchmarks/image_quality.py ``--keep``): hand-made results, hand-computed means
and within-seed ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(objective: str, steps: int, fd: float, train_steps: int = 100) -> dict:
    return {"objective": objective, "steps": steps, "train_steps": train_steps, "fd": fd}


def _write_seed(folder: str, fm100: float, mf1: float, mf2: float | None = None) -> None:
    rows = [_row("flow-matching", 100, fm100), _row("meanflow", 1, mf1)]
    if mf2 is not None:
        rows.append(_row("meanflow", 2, mf2))
    os.makedirs(folder)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"rows": rows, "step_seconds": {}}, f)


def _table(folder: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "image_seeds_table.py"),
                           folder], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(folder, "table.md")) as f:
        return f.read()


def test_seed_table_means_and_within_seed_ratios(tmp_path):
    _write_seed(str(tmp_path / "seed0"), fm100=2.0, mf1=4.0, mf2=3.0)
    _write_seed(str(tmp_path / "seed1"), fm100=4.0, mf1=4.0)
    table = _table(str(tmp_path))
    assert "100-step flow matching: 3.00" in table
    lines = {line.split("|")[3].strip(): line for line in table.splitlines()
             if line.startswith("| MeanFlow")}
    # 1 step: FDs 4 and 4, mean 4.00; over the mean reference 4/3 = 1.33; within each seed
    # 4/2 = 2.00 and 4/4 = 1.00, mean 1.50 (1.00-2.00)
    assert "| 4.00 (4.00-4.00, 2) | 1.33 | 1.50 (1.00-2.00) |" in lines["1"]
    # 2 steps: one seed only, 3.00; 3/3 = 1.00 over the mean reference, 3/2 = 1.50 within seed 0
    assert "| 3.00 (3.00-3.00, 1) | 1.00 | 1.50 (1.50-1.50) |" in lines["2"]


def test_seed_table_refuses_folders_without_the_reference(tmp_path):
    os.makedirs(tmp_path / "seed0")
    with open(tmp_path / "seed0" / "results.json", "w") as f:
        json.dump({"rows": [_row("meanflow", 1, 4.0)]}, f)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "image_seeds_table.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "100-step flow-matching" in proc.stderr


def test_keep_reuses_rows_by_entry_sampling_steps_and_training_step(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from image_quality import _kept_rows
    finally:
        sys.path.pop(0)
    assert _kept_rows(str(tmp_path)) == {}
    rows = [_row("flow-matching", 100, 3.0, train_steps=1294),
            _row("meanflow+time.ratio_start=0", 2, 4.0, train_steps=1233)]
    with open(tmp_path / "results.json", "w") as f:
        json.dump({"rows": rows, "step_seconds": {"meanflow": 0.8}}, f)
    kept = _kept_rows(str(tmp_path))
    assert kept["meanflow+time.ratio_start=0", 2, 1233]["fd"] == 4.0
    assert ("meanflow+time.ratio_start=0", 2, 1200) not in kept  # another training step: sampled
    assert ("meanflow", 2, 1233) not in kept  # another entry: sampled
    assert kept["step_seconds"] == {"meanflow": 0.8}


def test_carry_keeps_the_rows_of_entries_whose_runs_are_gone(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from image_quality import _kept_rows, carried_rows
    finally:
        sys.path.pop(0)
    rows = [_row("meanflow", 2, 4.0, train_steps=1233), _row("flow-matching", 100, 3.0),
            _row("meanflow", 1, 5.0, train_steps=1233), _row("imf", 1, 6.0)]
    with open(tmp_path / "results.json", "w") as f:
        json.dump({"rows": rows}, f)
    kept = _kept_rows(str(tmp_path))
    carried = carried_rows(kept, ["flow-matching", "meanflow"])
    assert [(r["objective"], r["steps"], r["fd"]) for r in carried] == [
        ("flow-matching", 100, 3.0), ("meanflow", 1, 5.0), ("meanflow", 2, 4.0)]
    with pytest.raises(SystemExit, match="--carry alphaflow: no rows"):
        carried_rows(kept, ["alphaflow"])


def test_eval_lines_table_averages_sampling_seeds_then_training_seeds(tmp_path):
    def line(run: str, steps: int, fd: float) -> str:
        return json.dumps({"run": run, "steps": steps, "fd": fd, "precision": 0.5,
                           "recall": 0.25})

    path = tmp_path / "eval.jsonl"
    # run a-s0: sampling seeds 0.1 and 0.3 -> 0.2; run a-s1: 0.4; mean 0.3 (0.2-0.4)
    path.write_text("\n".join([line("runs/a-s0", 1, 0.1), line("runs/a-s0", 1, 0.3),
                               line("runs/a-s1/", 1, 0.4), line("runs/b-s0", 2, 1.0)]) + "\n")
    script = os.path.join(ROOT, "benchmarks", "eval_lines_table.py")
    proc = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()
    assert "| a | 1 | 0, 1 | 0.300 (0.200-0.400) | 0.500 | 0.250 |" in rows
    assert "| b | 2 | 0 | 1.000 (1.000-1.000) | 0.500 | 0.250 |" in rows
    path.write_text(line("runs/unnamed", 1, 0.1) + "\n")
    proc = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "SETTING-sSEED" in proc.stderr


def test_objectives_report_pairs_each_seed_with_its_own_flow_matching(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from objectives_report import csv_records, eval_line_records, image_records, summarise
    finally:
        sys.path.pop(0)
    records: dict = {}
    steps: dict = {}
    for seed, fm, mf in ((0, 2.0, 3.0), (1, 4.0, 5.0)):
        os.makedirs(tmp_path / f"seed{seed}")
        with open(tmp_path / f"seed{seed}" / "results.json", "w") as f:
            json.dump({"rows": [_row("flow-matching", 100, fm, 1294), _row("mf+x=1", 1, mf, 1233),
                                _row("other", 1, 9.0)]}, f)
    image_records(str(tmp_path), "img", {"flow-matching": "flow matching", "mf+x=1": "MeanFlow"},
                  records, steps)
    lines = tmp_path / "eval.jsonl"
    lines.write_text("\n".join(json.dumps({"run": f"runs/{r}", "steps": k, "fd": fd,
                                           "checkpoint_step": 2000})
                               for r, k, fd in (("fm-s0", 100, 0.1), ("mf-s0", 1, 0.2),
                                                ("mf-s0", 1, 0.4), ("mf-s1", 1, 0.5))) + "\n")
    eval_line_records(str(lines), "dg", {"fm": "flow matching", "mf": "MeanFlow"}, records, steps)
    runs = tmp_path / "runs.csv"
    runs.write_text("label,set,seed,steps,swd1,swd2,swd4,swd100\n"
                    "fm,a,0,12000,,,,0.05\nmf,a,0,9700,0.1,0.09,0.08,\nmf,b,0,9700,9,9,9,\n")
    csv_records(str(runs), "2d", {"fm": "flow matching", "mf": "MeanFlow"}, "a", records, steps)
    cells = {(c["data"], c["objective"], c["steps"]): c for c in summarise(records)}
    img = cells["img", "MeanFlow", 1]
    assert (img["mean"], img["min"], img["max"], img["seeds"]) == (4.0, 3.0, 5.0, 2)
    assert abs(img["ratio"] - (3.0 / 2.0 + 5.0 / 4.0) / 2) < 1e-12  # within seed, then mean
    assert (img["ratio_min"], img["ratio_max"]) == (1.25, 1.5)
    assert ("img", "other", 1) not in cells
    dg = cells["dg", "MeanFlow", 1]
    # seed 0's two sampling seeds averaged (0.3) before the seeds; seed 1 has no flow matching
    assert abs(dg["mean"] - 0.4) < 1e-12 and abs(dg["ratio"] - 3.0) < 1e-12
    two_d = cells["2d", "MeanFlow", 2]
    assert abs(two_d["ratio"] - 0.09 / 0.05) < 1e-12 and steps["2d", "MeanFlow"] == 9700
    assert cells["2d", "MeanFlow", 1]["mean"] == 0.1  # set b's row is another set
