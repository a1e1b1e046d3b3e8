"""One job per run directory: an advisory lock on ``RUN/.lock``.

A training job holds ``fcntl.flock(LOCK_EX)`` on the file for as long as it may write the run
directory (rank 0 under torchrun; the other ranks learn the outcome through the process group).
A second job into the same directory fails at once with one line naming the holder (pid, host,
start time), before it changes anything. The kernel drops a flock when its process ends, however
it ends (SIGKILL included), so a lock left by a killed job never blocks the next run. The file
itself stays: its content is only a note for the message; the lock is the flock.

flock is not reliable on some network file systems (NFS before Linux 2.6.12 emulates it with
POSIX locks, which are per process); docs/reliability.md says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import IO

from ..errors import MeanFlowError, check
from ..runtime import distributed

LOCK_NAME = ".lock"


def refuse_file(out: str) -> None:
    """A run directory path that names an existing file: one clear error."""
    check(not os.path.isfile(out), f"--out {out!r} is an existing file; give a directory path")


class RunLock:
    """The lock of one run directory, taken with :meth:`acquire` and given back with
    :meth:`release` (or by the process ending)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`MeanFlowError` naming the job that holds it."""
        if self._file is not None:
            return
        refuse_file(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise MeanFlowError(
                f"run directory {self.run_dir!r} is in use by another training job ({holder}); "
                "wait for it to finish, stop it, or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        note = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        f.write(json.dumps(note) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        note = json.loads(text)
        return f"pid {note['pid']} on {note['host']}, started {note['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def hold_lock(out: str) -> Iterator[RunLock]:
    """Hold the run directory's lock while the block runs: rank 0 takes it, and every rank
    raises if it could not."""
    lock = RunLock(out)
    error = ""
    if distributed.from_env().is_main:
        try:
            lock.acquire()
        except MeanFlowError as exc:
            error = str(exc)
    error = distributed.gather_objects(error)[0]
    if error:
        raise MeanFlowError(error)
    try:
        yield lock
    finally:
        lock.release()
