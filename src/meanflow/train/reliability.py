"""Pieces that keep a run safe: signal handling, host random states, finiteness and memory
checks, and tidying the metrics log after a crash (see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

SIGNALS = ("SIGTERM", "SIGINT")


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT only set ``stop.received`` (the
    signal's name) so the loop can finish its step and save; a second SIGINT interrupts at once.
    Outside the main thread (where handlers cannot be installed) it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def host_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python's and NumPy's global random states (JSON) and the CUDA generators' (tensors).
    The trainer draws only from its own torch generator; these are saved so that user code
    (custom networks, data hooks) drawing from the global generators also resumes exactly."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)  # legacy=True is the default
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937: a legacy tuple
    kind, keys, pos, has_gauss, cached = np_state
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return meta, tensors


def restore_host_rng(meta: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> None:
    """Undo :func:`host_rng_state` (checkpoints written before it existed carry none)."""
    if meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch.cuda.is_available():
        states = [
            tensors[f"rng.cuda.{i}"]
            for i in range(torch.cuda.device_count())
            if f"rng.cuda.{i}" in tensors
        ]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def all_finite(model: nn.Module) -> bool:
    """True when every parameter and buffer of ``model`` is finite."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def memory_mib() -> float:
    """Resident memory of this process now (Linux /proc), else its peak (getrusage), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim_metrics(path: str, step: int) -> None:
    """Drop records after ``step`` from metrics.jsonl (logged after the checkpoint a resumed
    run restarts from, so they would be logged twice), and a torn last line."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                keep.append(json.dumps(record) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def last_metrics(run_dir: str) -> dict:
    """The last complete record of ``run_dir``/metrics.jsonl ({} when there is none)."""
    last: dict = {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    last = json.loads(line)
                except json.JSONDecodeError:
                    continue
    except OSError:
        pass
    return last
