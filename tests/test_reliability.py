"""Runs survive interruptions, crashes, failed writes and numerical faults."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meanflow.cli import main
from meanflow.config.build import build_objective
from meanflow.runs.checkpoint import latest_checkpoint, list_checkpoints
from meanflow.train import TrainConfig, configure, load_run, train
from meanflow.runs import checkpoint as checkpoint_module
from meanflow.train import loop as loop_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def final_tensors(run_dir):
    tensors = load_file(latest_checkpoint(run_dir) + ".safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def assert_identical(a, b):
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


class CrashAt:
    """Wraps the objective: raises at call number ``call`` (a crash in the middle of a step).
    ``wrap(objective)`` gives the faulty objective to pass to ``train(objective=...)``; with
    ``monkeypatch``, runs started from the command line get it too."""

    def __init__(self, monkeypatch, call, fault="crash"):
        self.calls, self.call, self.fault = 0, call, fault
        if monkeypatch is not None:
            real = loop_module.build_objective
            monkeypatch.setattr(loop_module, "build_objective",
                                lambda cfg, num_classes=0: self.wrap(real(cfg, num_classes)))

    def wrap(self, objective):
        def wrapped(model, x, y=None, **kwargs):
            self.calls += 1
            out = objective(model, x, y, **kwargs)
            if self.fault == "crash" and self.calls == self.call:
                raise RuntimeError("simulated crash")
            if self.fault == "nan" and self.calls in self.call:
                out.loss = out.loss * float("nan")
            return out
        wrapped.draw = objective.draw  # the loop draws each batch's randomness first
        wrapped.at_step = objective.at_step  # and sets the step's schedules (time.ratio_start)
        return wrapped


TINY = ["--data", "eight-gaussians", "--preset", "tiny", "--batch-size", "64",
        "--set", "grad_accum=2", "--set", "ckpt_every=3", "--set", "log_every=1",
        "--set", "ema_decay=0.9", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "ref")
    assert main(["train", "--out", out, "--steps", "10", *TINY]) == 0
    return out


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_resume_at_several_points_is_bitwise_identical(stop_after, uninterrupted, tmp_path,
                                                       capsys):
    out = str(tmp_path / "run")
    assert run(capsys, "train", "--out", out, "--steps", str(stop_after), *TINY)[0] == 0
    code, _, err = run(capsys, "train", "--out", out, "--steps", "10", "--resume", "--quiet")
    assert code == 0, err
    assert_identical(out, uninterrupted)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, 11))


def test_crash_mid_accumulation_then_rerun_same_command(uninterrupted, tmp_path, capsys,
                                                         monkeypatch):
    """A crash in the second micro-batch of step 8 loses steps 7-8 only; rerunning the very same
    command resumes from the checkpoint at step 6 and ends bitwise identical."""
    out = str(tmp_path / "run")
    argv = ["train", "--out", out, "--steps", "10", *TINY]
    with monkeypatch.context() as m:
        CrashAt(m, call=2 * 7 + 2)  # step 8 is the 8th step; 2 micro-batches per step
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(argv)
    assert [os.path.basename(s) for s in list_checkpoints(os.path.join(out, "checkpoints"))] \
        == ["step-00000003", "step-00000006"]
    code, _, err = run(capsys, *argv)
    assert code == 0 and "resuming" in err, err
    assert_identical(out, uninterrupted)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, 11))  # the records of steps 7 after the crash are not doubled


def test_crash_then_rerun_with_a_ratio_schedule_is_bitwise_identical(tmp_path, capsys,
                                                                      monkeypatch):
    """With the r != t share on a schedule (time.ratio_start), each step's share is a function of
    the step, so a crashed run rerun with the same command ends as the uninterrupted one."""
    schedule = [*TINY, "--set", "time.ratio_start=0", "--set", "time.ratio=0.75"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    assert main(["train", "--out", ref, "--steps", "10", *schedule]) == 0
    argv = ["train", "--out", out, "--steps", "10", *schedule]
    with monkeypatch.context() as m:
        CrashAt(m, call=2 * 7 + 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(argv)
    code, _, err = run(capsys, *argv)
    assert code == 0 and "resuming" in err, err
    assert_identical(out, ref)


def test_rerun_with_other_settings_is_refused(uninterrupted, capsys):
    before = os.listdir(os.path.join(uninterrupted, "checkpoints"))
    code, _, err = run(capsys, "train", "--out", uninterrupted, *TINY, "--set", "time.ratio=0.5")
    assert code == 2 and "time" in err and "--overwrite" in err
    assert os.listdir(os.path.join(uninterrupted, "checkpoints")) == before


def test_sigterm_saves_a_loadable_checkpoint_and_exits(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "meanflow.cli", "train", "--data", "rings", "--preset", "tiny",
           "--steps", "1000000", "--out", out, "--set", "ckpt_every=1000000",
           "--set", "log_every=1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    loaded = load_run(out)
    assert loaded.step >= 1 and np.isfinite(loaded.sample(10)).all()
    records = [json.loads(line) for line in open(metrics)]
    assert records[-1]["step"] == loaded.step  # the checkpoint is at the last finished step


def test_transient_nan_is_skipped_and_counted(tmp_path, monkeypatch):
    cfg = configure(TrainConfig(), "tiny", [("data", "rings"), ("steps", 6), ("log_every", 1)])
    faulty = CrashAt(None, call={3}, fault="nan").wrap(build_objective(cfg))
    result = train(cfg, str(tmp_path / "run"), progress=False, objective=faulty)
    assert result.step == 6 and result.skipped_steps == 1
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["skipped"] == 1 and all(np.isfinite(r["loss"]) for r in records)


def test_nan_guard_stops_with_diagnostic_and_last_good_checkpoint(tmp_path, capsys,
                                                                  monkeypatch):
    CrashAt(monkeypatch, call=set(range(4, 100)), fault="nan")
    out = str(tmp_path / "run")
    code, _, err = run(capsys, "train", "--data", "rings", "--preset", "tiny", "--out", out,
                       "--set", "max_bad_steps=5", "--set", "ckpt_every=100", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "5 consecutive non-finite steps at step 3: loss nan" in err and "t in [" in err
    assert latest_checkpoint(out).endswith("step-00000003")
    assert all(torch.isfinite(v).all() for v in final_tensors(out).values())


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """The disk fills up while the second checkpoint is written: one clear line, exit 2, the
    first checkpoint is untouched and still used, no partial file counts as a checkpoint."""
    out = str(tmp_path / "run")
    real = checkpoint_module.save_file
    writes = []

    def failing(tensors, path):
        writes.append(path)
        if len(writes) == 2:
            real(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(28, "No space left on device")
        real(tensors, path)
    monkeypatch.setattr(checkpoint_module, "save_file", failing)
    argv = ["train", "--data", "rings", "--preset", "tiny", "--out", out, "--steps", "10",
            "--set", "ckpt_every=4", "--quiet"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "step 8" in err and "No space left" in err
    stems = list_checkpoints(os.path.join(out, "checkpoints"))
    assert [os.path.basename(s) for s in stems] == ["step-00000004"]
    assert checkpoint_module.load_checkpoint(stems[0])[1]["step"] == 4  # intact
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if ".tmp" in n]
    monkeypatch.setattr(checkpoint_module, "save_file", real)
    code, _, err = run(capsys, *argv)  # rerun: resumes from step 4
    assert code == 0 and "step 4" in err, err
    assert load_run(out).step == 10


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(capsys, "train", "--data", "rings", "--preset", "tiny", "--out", out,
               "--steps", "8", "--set", "ckpt_every=4", "--quiet")[0] == 0
    newest = latest_checkpoint(out)
    data = open(newest + ".safetensors", "rb").read()
    open(newest + ".safetensors", "wb").write(data[:100])
    code, _, err = run(capsys, "sample", "--run", out, "--num", "5",
                       "--out", str(tmp_path / "s.npy"))
    assert code == 0 and "step-00000008" in err and "older step-00000004" in err
    assert load_run(out).step == 4
