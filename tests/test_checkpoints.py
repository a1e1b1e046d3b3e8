"""Verified checkpoints (runs/checkpoint.py, docs/reliability.md): every checkpoint records the
SHA-256 and size of its safetensors file; resume uses the newest one that matches, with one
warning, and sets the corrupt ones aside; retention never deletes the newest good checkpoint;
checkpoints written before the checksum existed still load."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from meanflow.runs import checkpoint as ckpt
from meanflow.train import TrainConfig, configure, load_run, train
from meanflow.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--data", "rings", "--preset", "tiny", "--threads", "1", "--set", "ckpt_every=4",
       "--set", "log_every=1", "--quiet"]


def cli(out, steps):
    """``meanflow train`` in a fresh process; returns (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.run([sys.executable, "-m", "meanflow.cli", "train", "--out", out,
                           "--steps", str(steps), *RUN], capture_output=True, text=True,
                          env=env, timeout=600)
    return proc.returncode, proc.stderr


def truncate(stem):
    path = stem + ".safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def names(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def weights(stem):
    tensors = load_file(stem + ".safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def test_two_truncated_checkpoints_in_a_row_leave_a_resumable_run(tmp_path):
    """The failure of the issue, in real processes: the newest checkpoint is truncated, the run
    resumes from the previous one and writes a new one, which is truncated too. Each resume
    warns once, sets the damaged file aside and keeps the good older one, and the run ends
    bitwise equal to an uninterrupted one."""
    out = str(tmp_path / "run")
    assert cli(out, 6)[0] == 0
    assert names(out) == [f"step-0000000{s}.{e}" for s in (4, 6) for e in ("json", "safetensors")]
    truncate(os.path.join(out, "checkpoints", "step-00000006"))
    code, err = cli(out, 8)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step-00000006" in warnings[0], err
    assert "using the older step-00000004" in warnings[0]
    assert "step-00000006.safetensors.corrupt" in names(out)
    assert "step-00000004.json" in names(out)  # kept: the newest good one before step 8
    truncate(os.path.join(out, "checkpoints", "step-00000008"))
    code, err = cli(out, 10)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step-00000008" in warnings[0], err
    assert "step-00000008.safetensors.corrupt" in names(out)
    assert load_run(out).step == 10
    ref = str(tmp_path / "ref")
    assert cli(ref, 10)[0] == 0
    a, b = weights(ckpt.latest_checkpoint(out)), weights(ckpt.latest_checkpoint(ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fake(directory, step, good=True, checksum=True):
    """A checkpoint file pair as save_checkpoint writes it; ``good=False`` truncates it;
    ``checksum=False`` drops the checksum (the format before it existed)."""
    stem = ckpt.save_checkpoint(directory, step, {"model.w": torch.full((64,), float(step))},
                                {"config": {}}, keep=100)
    if not good:
        truncate(stem)
    if not checksum:
        meta = json.load(open(stem + ".json"))
        del meta["sha256"], meta["bytes"]
        json.dump(meta, open(stem + ".json", "w"))
    return stem


def test_retention_never_deletes_the_only_good_checkpoint(tmp_path):
    d = str(tmp_path / "checkpoints")
    _fake(d, 2)
    _fake(d, 4)
    _fake(d, 6, good=False)
    kept = ckpt.retain(d, keep=1)
    assert [os.path.basename(s) for s in kept] == ["step-00000004"]
    assert sorted(os.listdir(d)) == ["step-00000004.json", "step-00000004.safetensors",
                                     "step-00000006.json.corrupt",
                                     "step-00000006.safetensors.corrupt"]
    _fake(d, 8, good=False)  # a newer corrupt one: the only good checkpoint stays
    _fake(d, 10, good=False)
    ckpt.retain(d, keep=1)
    assert [os.path.basename(s) for s in ckpt.list_checkpoints(d)] == ["step-00000004"]


def test_a_corrupt_file_is_never_kept_as_latest_by_a_run(tmp_path):
    """Damage in the middle of a run (the newest checkpoint truncated after it was written):
    the next save sets it aside and keeps the good older one, so the run can always resume."""
    cfg = configure(TrainConfig(), "tiny", [("data", "rings"), ("steps", 8), ("ckpt_every", 2),
                                             ("keep_checkpoints", 2)])

    class Saboteur:
        def after_step(self, state: TrainState, stats) -> None:
            if state.step in (4, 6):  # right after the checkpoint of that step
                truncate(ckpt.latest_checkpoint(out))

        def close(self) -> None:
            pass

    out = str(tmp_path / "run")
    train(cfg, out, progress=False, hooks=[Saboteur()])
    left = names(out)
    assert "step-00000004.safetensors.corrupt" in left and "step-00000006.safetensors.corrupt" \
        in left
    assert [os.path.basename(s) for s in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))] \
        == ["step-00000002", "step-00000008"]  # step 2 kept until a second good one existed


def test_fallback_warns_once_and_readers_change_nothing(tmp_path, capsys):
    d = str(tmp_path / "checkpoints")
    _fake(d, 2)
    _fake(d, 4, good=False)
    before = sorted(os.listdir(d))
    for tensors in (False, True, True):  # the command line looks, then the trainer
        stem, loaded, meta = ckpt.load_latest_good(str(tmp_path), tensors=tensors)
        assert meta["step"] == 2
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "step-00000004" in err and "older step-00000002" in err
    assert sorted(os.listdir(d)) == before  # only the trainer sets files aside


def test_checksum_catches_damage_the_header_does_not(tmp_path):
    """A flipped byte inside a tensor keeps the safetensors header valid: only the SHA-256 sees
    it."""
    d = str(tmp_path / "checkpoints")
    _fake(d, 2)
    stem = _fake(d, 4)
    path = stem + ".safetensors"
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert hashlib.sha256(bytes(data)).hexdigest() != json.load(open(stem + ".json"))["sha256"]
    with pytest.raises(ckpt.CorruptCheckpoint, match="SHA-256"):
        ckpt.load_checkpoint(stem)
    assert ckpt.load_latest_good(str(tmp_path))[2]["step"] == 2


def test_checkpoints_without_a_checksum_still_load_and_resume(tmp_path, capsys):
    """A run written before checksums (no sha256/bytes in its JSON) loads, resumes, and its old
    checkpoint counts as good (unverified but readable) for retention."""
    cfg = configure(TrainConfig(), "tiny", [("data", "rings"), ("steps", 4), ("ckpt_every", 2)])
    out = str(tmp_path / "run")
    train(cfg, out, progress=False)
    for stem in ckpt.list_checkpoints(os.path.join(out, "checkpoints")):
        meta = json.load(open(stem + ".json"))
        del meta["sha256"], meta["bytes"]
        json.dump(meta, open(stem + ".json", "w"))
    assert ckpt.verify(ckpt.latest_checkpoint(out)) is False  # readable, not verified
    assert load_run(out).step == 4
    cfg.steps = 6
    result = train(cfg, out, resume=True, progress=False)
    assert result.step == 6 and "warning" not in capsys.readouterr().err
    stems = ckpt.list_checkpoints(os.path.join(out, "checkpoints"))
    assert [os.path.basename(s) for s in stems] == ["step-00000004", "step-00000006"]
    assert ckpt.verify(stems[-1]) is True
