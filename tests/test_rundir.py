"""Run directories belong to one job, and nothing a user made is lost: the lock (real
processes), --restart-if-changed's limits, messages naming each differing setting with its old
and new value, and ``meanflow.fit``, the Python form of ``meanflow train``."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import run

import meanflow
from meanflow.errors import MeanFlowError
from meanflow.runs.checkpoint import list_checkpoints
from meanflow.runs.lock import LOCK_NAME, RunLock

SLOW = ["--set", "model.hidden=32", "--batch-size", "64", "--set", "ckpt_every=20",
        "--set", "log_every=20", "--threads", "1", "--quiet"]


def _train(out, *extra):
    command = [sys.executable, "-m", "meanflow", "train", "--data", "two-moons", "--preset",
               "toy-2d", "--out", out, *SLOW, *(extra or ("--steps", "100000"))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, out, timeout=120):
    deadline = time.time() + timeout
    while not list_checkpoints(os.path.join(out, "checkpoints")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.1)


def test_a_second_job_is_refused_and_a_killed_holder_never_blocks(tmp_path):
    out = str(tmp_path / "busy")
    first = _train(out)
    try:
        _wait_for_checkpoint(first, out)
        config_before = open(os.path.join(out, "config.json")).read()
        second = _train(out)  # the same command while the first trains
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use by" in lines[0]
        assert open(os.path.join(out, "config.json")).read() == config_before
        assert first.poll() is None  # the holder trains on
        for _ in range(3):  # a run in training reads back from its last complete checkpoint
            sampled = subprocess.run([sys.executable, "-m", "meanflow", "sample", "--run", out,
                                      "--num", "50", "--out", str(tmp_path / "s.npy"),
                                      "--overwrite", "--threads", "1"],
                                     capture_output=True, text=True, timeout=120)
            assert sampled.returncode == 0, sampled.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the flock
        first.wait()
    saved = max(int(json.loads(line)["step"])
                for line in open(os.path.join(out, "metrics.jsonl")) if line.strip())
    again = _train(out, "--steps", str(saved + 40))  # the same run, a little further
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "resuming" in err and "in use by" not in err, err
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-1]["step"] == saved + 40


def test_the_lock_names_its_holder_and_is_reentrant_per_object(tmp_path):
    out = str(tmp_path / "run")
    with RunLock(out) as held:
        held.acquire()  # a second acquire by the holder is a no-op
        note = json.load(open(os.path.join(out, LOCK_NAME)))
        assert note["pid"] == os.getpid()
        with pytest.raises(MeanFlowError, match=f"in use by another training job \\(pid {os.getpid()}"):
            RunLock(out).acquire()  # another open file description: refused, even in-process
    RunLock(out).acquire()  # released: free again


def _tiny(capsys, out, *extra):
    return run(capsys, "train", "--data", "two-moons", "--preset", "tiny", "--out", out,
               "--quiet", "--steps", "10", *extra)


def test_restart_if_changed_never_replaces_another_data_set_or_a_run_it_did_not_make(
        tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _tiny(capsys, out, "--set", "ckpt_every=5")[0] == 0  # made without the flag
    files = sorted(os.listdir(out)), sorted(os.listdir(os.path.join(out, "checkpoints")))
    code, _, err = _tiny(capsys, out, "--restart-if-changed", "--set", "ckpt_every=5",
                         "--set", "time.ratio=0.5")
    assert code == 2 and "that --restart-if-changed did not create" in err
    assert (sorted(os.listdir(out)), sorted(os.listdir(os.path.join(out, "checkpoints")))) == files

    other = str(tmp_path / "other")
    assert _tiny(capsys, other, "--restart-if-changed", "--steps", "10")[0] == 0
    config = json.load(open(os.path.join(other, "config.json")))
    for name in os.listdir(os.path.join(other, "checkpoints")):  # as if stopped at 10 of 40
        if name.endswith(".json"):
            path = os.path.join(other, "checkpoints", name)
            meta = json.load(open(path))
            meta["config"]["steps"] = 40
            json.dump(meta, open(path, "w"))
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--preset", "tiny", "--out",
                       other, "--quiet", "--restart-if-changed")
    assert code == 2 and "of other data ('two-moons', not 'checkerboard')" in err, err
    assert json.load(open(os.path.join(other, "config.json"))) == config


def test_differing_settings_are_named_with_old_and_new_values(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _tiny(capsys, out)[0] == 0
    code, _, err = _tiny(capsys, out, "--set", "optim.lr=0.005", "--set", "loss.p=0.5")
    assert code == 2
    assert "optim.lr: 0.001 -> 0.005" in err and "loss.p: 1.0 -> 0.5" in err, err
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--set", "loss.p=0.5")
    assert code == 2 and "loss.p: 1.0 -> 0.5" in err and "only --steps may change" in err


def test_fit_is_the_library_form_of_meanflow_train(tmp_path):
    out = str(tmp_path / "run")
    result = meanflow.fit(out, data="two-moons", preset="tiny", steps=10,
                          settings={"model.hidden": 16}, progress=False)
    assert result.step == 10 and not result.complete
    assert json.load(open(os.path.join(out, "config.json")))["model"]["hidden"] == 16
    again = meanflow.fit(out, data="two-moons", preset="tiny", steps=10,
                         settings={"model.hidden": 16}, progress=False)
    assert again.complete and again.step == 10
    with pytest.raises(MeanFlowError, match="model.hidden: 16 -> 8"):
        meanflow.fit(out, data="two-moons", preset="tiny", steps=10,
                     settings={"model.hidden": 8}, progress=False)
    assert meanflow.load_run(out).config.model.hidden == 16  # the run is untouched
    with pytest.raises(MeanFlowError, match="--data is required"):
        meanflow.fit(str(tmp_path / "none"), progress=False)


def test_overwrite_removes_only_run_files(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _tiny(capsys, out)[0] == 0
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    open(os.path.join(out, "one-step.png"), "wb").write(b"old picture of this run")
    assert _tiny(capsys, out, "--overwrite", "--set", "loss.p=0.5")[0] == 0
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    assert not os.path.exists(os.path.join(out, "one-step.png"))  # went with its run
