"""The files of a run directory, and the one place that replaces them.

A run owns :data:`RUN_FILES` in its directory and nothing else: ``overwrite`` removes exactly
those (a user's other files stay), and a directory that holds anything else is refused unless
``overwrite`` is given. The lock file (:mod:`meanflow.runs.lock`) and the note of how the run
was created (``origin.json``) do not make a directory "not empty".
"""

from __future__ import annotations

import os
import shutil

from ..errors import MeanFlowError
from .lock import LOCK_NAME, refuse_file

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "checkpoints",
    "samples-1step.png",
    "samples",
    "loss.png",
    "tensorboard",
    "one-step.png",  # the demo's picture (scripts/demo.sh): it goes with the run it shows
)
ORIGIN_NAME = "origin.json"  # how the run was created (meanflow.train.rundir)
_BOOKKEEPING = (LOCK_NAME, ORIGIN_NAME)


def check_run_dir(out: str, overwrite: bool) -> None:
    """Refuse ``out`` when it is a file, or a non-empty directory and not ``overwrite``."""
    refuse_file(out)
    if not overwrite and os.path.isdir(out) and set(os.listdir(out)) - set(_BOOKKEEPING):
        raise MeanFlowError(
            f"run directory {out!r} already exists and is not empty; pass "
            "--resume to continue it, --overwrite to replace it, or another --out"
        )


def prepare_run_dir(out: str, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty one unless ``overwrite`` (then only our files go)."""
    check_run_dir(out, overwrite)
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
