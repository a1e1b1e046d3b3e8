"""Data-parallel training under torchrun (gloo, 2 CPU processes): gradients are synchronised
through the JVP, every rank holds the same weights, and they equal one process training on the
same global batch; also with gradient accumulation, and after a worker is killed mid-run.

Tolerance: the all-reduce adds the two halves' gradients in another order than one process
does, so weights agree to float32 rounding, not bitwise: |a - b| <= 1e-5 + 1e-4 |b| after the
steps below (observed differences are about 1e-7)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this PyTorch has no torch.distributed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(dump):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEANFLOW_TEST_DUMP=str(dump))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(nproc, *args, restarts=0):
    # the c10d rendezvous (as --standalone) gives each restart round a fresh store; the static
    # one (--master-port) can hand a restarted worker its dead peer's address
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{_port()}", *args]


def _train(tmp_path, name, argv, nproc=1):
    """Train with ``argv`` in ``nproc`` processes; return each rank's final tensors."""
    dump = tmp_path / f"dump-{name}"
    dump.mkdir()
    out = ["--out", str(tmp_path / name), "--threads", "1", "--quiet", *argv]
    cmd = (_torchrun(nproc, WORKER, *out) if nproc > 1 else [sys.executable, WORKER, *out])
    proc = subprocess.run(cmd, env=_env(dump), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(str(dump / f"rank{k}.safetensors")) for k in range(nproc)]


def _equal(a, b):
    """``a`` and ``b`` hold the same non-empty set of tensors, bit for bit."""
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _close(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a), worst
    return worst


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Eight Gaussians with their component as the class label (guidance and label dropout
    take part)."""
    rng = np.random.default_rng(0)
    k = rng.integers(0, 8, 4096)
    angle = k * np.pi / 4
    x = np.stack([np.cos(angle), np.sin(angle)], 1) * 2 + 0.1 * rng.standard_normal((4096, 2))
    path = tmp_path_factory.mktemp("data") / "gauss.npz"
    np.savez(path, x=x.astype(np.float32), y=k.astype(np.int64))
    return str(path)


COMMON = ["--preset", "tiny", "--batch-size", "64", "--steps", "8", "--set", "log_every=2",
          "--set", "ckpt_every=4", "--set", "time.ratio=0.5", "--set", "optim.lr=3e-3"]


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    argv = ["--data", "eight-gaussians", *COMMON]
    one = _train(tmp_path, "one", argv)[0]
    two = _train(tmp_path, "two", argv, nproc=2)
    _equal(two[0], two[1])  # ranks agree exactly
    gap = _close(two[0], one)
    initial = _train(tmp_path, "zero", [*argv, "--steps", "1"])[0]  # the last --steps wins
    # training moved the weights far more than the rank-vs-process difference
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    assert moved > 100 * gap


def test_accumulation_under_ddp_matches_the_full_batch(tmp_path, labelled):
    argv = ["--data", labelled, *COMMON, "--set", "guidance.omega=1.5",
            "--set", "guidance.label_dropout=0.2"]
    one = _train(tmp_path, "one", argv)[0]
    two = _train(tmp_path, "two-accum", [*argv, "--set", "grad_accum=2"], nproc=2)
    _equal(two[0], two[1])
    _close(two[0], one)


def test_killed_worker_is_restarted_by_torchrun_and_resumes(tmp_path):
    argv = ["--data", "eight-gaussians", "--preset", "tiny", "--batch-size", "64",
            "--steps", "300", "--set", "ckpt_every=50", "--set", "log_every=50",
            "--set", "keep_checkpoints=20"]
    dump = tmp_path / "dump"
    dump.mkdir()
    run_dir = tmp_path / "run"
    cmd = _torchrun(2, WORKER, "--out", str(run_dir), "--threads", "1", "--quiet", *argv,
                    restarts=1)
    # rank 1 SIGKILLs itself at its second checkpoint (step 100) in the first attempt only
    proc = subprocess.Popen(cmd, env=dict(_env(dump), MEANFLOW_TEST_KILL_AT="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err, err[-3000:]  # the first attempt died of SIGKILL
    assert "resuming" in err, err[-3000:]
    resumed_at = int(err.split("at step ")[1].split()[0])
    assert resumed_at == 50, err[-3000:]  # the last checkpoint before the crash at step 100
    two = [load_file(str(dump / f"rank{k}.safetensors")) for k in range(2)]
    _equal(two[0], two[1])
    # resuming is exact: the same weights as two processes never interrupted
    uninterrupted = _train(tmp_path, "uninterrupted", argv, nproc=2)[0]
    _equal(two[0], uninterrupted)
