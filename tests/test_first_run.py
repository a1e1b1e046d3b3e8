"""The first hour: the demo resumes instead of starting over, a finished run's command can be
rerun, and ``--threads`` (with its measured ``auto`` default) works on every command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import run

from meanflow.cli import build_parser
from meanflow.errors import MeanFlowError
from meanflow.runs.checkpoint import list_checkpoints
from meanflow.runtime.threads import choose_threads, parse_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "model.hidden=32", "--batch-size", "128", "--set", "ckpt_every=50",
         "--set", "log_every=50", "--threads", "1"]


def test_rerunning_a_finished_run_exits_0_without_training(tmp_path, capsys):
    out = str(tmp_path / "run")
    command = ["train", "--data", "two-moons", "--preset", "tiny", "--out", out, "--quiet"]
    assert run(capsys, *command)[0] == 0
    checkpoints = {name: os.path.getmtime(os.path.join(out, "checkpoints", name))
                   for name in os.listdir(os.path.join(out, "checkpoints"))}
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    os.remove(os.path.join(out, "samples-1step.png"))  # as if killed after the last checkpoint
    code, stdout, err = run(capsys, *command)
    assert code == 0, err
    assert "is complete (50 of 50 steps); nothing to train" in err and "resuming" not in err
    result = json.loads(stdout)
    assert result["complete"] is True and result["step"] == 50 and result["seconds"] == 0
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics  # nothing was trained
    assert {name: os.path.getmtime(os.path.join(out, "checkpoints", name))
            for name in os.listdir(os.path.join(out, "checkpoints"))} == checkpoints
    assert os.path.isfile(os.path.join(out, "samples-1step.png"))  # the preview is redrawn
    # --resume at the finished step is complete too; fewer steps than trained is an error
    assert run(capsys, "train", "--out", out, "--resume", "--quiet")[0] == 0
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "20", "--quiet")
    assert code == 2 and "already trained 50 steps, more than --steps 20" in err


def test_restart_if_changed_resumes_the_same_run_and_replaces_another(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--data", "two-moons", "--preset", "tiny", "--out", out, "--quiet",
            "--restart-if-changed"]
    assert run(capsys, *base, "--steps", "25")[0] == 0
    code, _, err = run(capsys, *base, "--steps", "50")
    assert code == 0 and "at step 25 of 50; resuming" in err
    os.makedirs(os.path.join(out, "samples"))  # a file of the older run
    code, _, err = run(capsys, *base, "--set", "time.ratio=0.5")  # finished: never replaced
    assert code == 2 and "that has finished (50 steps)" in err and "time.ratio: 0.25 -> 0.5" in err
    assert os.path.isdir(os.path.join(out, "samples"))
    _unfinish(out, 100)  # as if stopped at step 50 of 100
    code, _, err = run(capsys, *base, "--set", "time.ratio=0.5")
    assert code == 0 and "holds a run with other settings (time); starting over" in err
    assert not os.path.exists(os.path.join(out, "samples"))
    assert json.load(open(os.path.join(out, "config.json")))["time"]["ratio"] == 0.5
    code, _, err = run(capsys, *base, "--resume")
    assert code == 2 and "drop --resume" in err


def _unfinish(out, steps):
    """Make the finished run in ``out`` look stopped before ``steps`` (its saved configuration
    asks for ``steps``), as a run interrupted by a signal or a crash is."""
    for name in os.listdir(os.path.join(out, "checkpoints")):
        if name.endswith(".json"):
            path = os.path.join(out, "checkpoints", name)
            meta = json.load(open(path))
            meta["config"]["steps"] = steps
            json.dump(meta, open(path, "w"))
    config = json.load(open(os.path.join(out, "config.json")))
    json.dump({**config, "steps": steps}, open(os.path.join(out, "config.json"), "w"))


def _demo(out, *extra, **popen):
    env = {**os.environ, "MEANFLOW_SKIP_SETUP": "1",
           "MEANFLOW_VENV": os.path.dirname(os.path.dirname(sys.executable))}
    return subprocess.Popen([os.path.join(ROOT, "scripts", "demo.sh"), out, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.path.dirname(sys.executable), "meanflow")),
                    reason="the meanflow command is not installed beside this Python")
def test_demo_rerun_after_sigint_resumes_and_a_finished_demo_only_redraws(tmp_path):
    out = str(tmp_path / "demo")
    os.makedirs(out)
    open(os.path.join(out, "one-step.png"), "wb").write(b"stale")  # from an older demo
    demo = _demo(out, "--steps", "3000", *SMALL, start_new_session=True)
    deadline = time.time() + 120
    while not list_checkpoints(os.path.join(out, "checkpoints")) and time.time() < deadline:
        assert demo.poll() is None, demo.communicate()
        time.sleep(0.1)
    assert not os.path.exists(os.path.join(out, "one-step.png"))  # the stale picture is gone
    os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole group
    _, err = demo.communicate(timeout=120)
    assert demo.returncode == 130, err
    assert "the checkpoint is saved; rerun the same command to resume" in err
    saved = max(int(json.loads(line)["step"])
                for line in open(os.path.join(out, "metrics.jsonl")))
    assert 0 < saved < 3000

    again = _demo(out, "--steps", "3000", *SMALL)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming" in err and "starting over" not in err
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-1]["step"] == 3000
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))  # resumed, not restarted: no step logged twice
    png = os.path.join(out, "one-step.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    mtime = os.path.getmtime(os.path.join(out, "metrics.jsonl"))
    last = _demo(out, "--steps", "3000", *SMALL)
    _, err = last.communicate(timeout=120)
    assert last.returncode == 0 and "is complete (3000 of 3000 steps)" in err, err
    assert os.path.getmtime(os.path.join(out, "metrics.jsonl")) == mtime
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_threads_option_on_every_command():
    parser = build_parser()
    commands = [["train", "--data", "x"], ["sample", "--run", "r", "--num", "1", "--out", "o"],
                ["eval", "--run", "r", "--reference", "x"],
                ["features", "train", "--data", "x", "--out", "o"]]
    for argv in commands:
        assert parser.parse_args(argv + ["--threads", "3"]).threads == "3"
        assert parser.parse_args(argv).threads == "auto"


def test_threads_are_applied_and_bad_values_refused(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        out = str(tmp_path / "run")
        assert run(capsys, "train", "--data", "two-moons", "--preset", "tiny", "--out", out,
                   "--quiet", "--steps", "10", "--threads", "1")[0] == 0
        assert torch.get_num_threads() == 1
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert records[-1]["threads"] == 1
        code, _, err = run(capsys, "sample", "--run", out, "--num", "5", "--out",
                           str(tmp_path / "s.npy"), "--threads", "two")
        assert code == 2 and err.count("\n") == 1
        assert "--threads must be a positive number of threads or 'auto', got 'two'" in err
    finally:
        torch.set_num_threads(before)


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    import meanflow.runtime.threads as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    for busy, expected in ((0.2, 4), (1.4, 3), (2.0, 2), (3.6, 1), (7.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1, b=busy: b)
        choice = choose_threads("auto")
        assert choice.threads == expected, busy
        assert ("free" in choice.reason) == (expected == 4)
    assert choose_threads(2).threads == 2 and choose_threads("2").reason == "as requested"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads("auto") == threads.ThreadChoice(3, "OMP_NUM_THREADS")
    assert choose_threads("1").threads == 1  # the option wins over the environment
    assert parse_threads("auto") is None and parse_threads(None) is None
    for bad in ("-1", "1.5", "many"):
        with pytest.raises(MeanFlowError):
            parse_threads(bad)


def test_busy_cores_sees_a_spinning_process():
    """A process spinning on one of the usable cores is seen as about one busy core."""
    import meanflow.runtime.threads as threads

    if not os.path.isfile("/proc/stat"):
        pytest.skip("no /proc/stat")
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})"
                             "\nwhile True: pass"])
    try:
        time.sleep(0.3)
        busy = threads.busy_cores(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy >= 0.7  # other work on the machine can only add to it


def test_vector_runs_log_one_step_sample_quality_that_improves(tmp_path, capsys):
    """metrics.jsonl records swd_1step (one-step EMA samples against training points) and its
    floor; on a shifted, stretched Gaussian it falls far from where training started."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.normal(size=(4000, 2)) * np.array([0.5, 2.0]) + np.array([3.0, -2.0])
    np.save(tmp_path / "g.npy", data.astype(np.float32))
    out = str(tmp_path / "run")
    assert run(capsys, "train", "--data", str(tmp_path / "g.npy"), "--preset", "tiny", "--out",
               out, "--quiet", "--steps", "300", "--set", "log_every=5", "--set",
               "normalize=false", "--set", "optim.lr=3e-3", "--set", "loss.p=0", "--set",
               "time.dist=uniform", "--set", "ema_decay=0.95", "--threads", "1")[0] == 0
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    swd = [r["swd_1step"] for r in records]
    floor = records[0]["swd_floor"]
    assert len(swd) == 60 and all(r["swd_floor"] == floor for r in records)
    assert 0 < floor < min(swd[-10:]) and max(swd[-10:]) < 0.4 * swd[0], (floor, swd)
