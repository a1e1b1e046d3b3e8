"""Checkpoints: tensors in safetensors, everything else in JSON. Nothing is pickled, so loading
a checkpoint never executes code.

A checkpoint ``step-00001000`` is two files in ``RUN/checkpoints/``: ``.safetensors`` with
``model.*``, ``ema.*`` (the primary EMA; extras ``ema-<decay>.*``, named under ``emas`` in the
JSON), ``optim.<param index>.<state name>``, ``rng.*`` and ``data.*`` tensors, and ``.json``
with the step, config, optimizer hyper-parameters and counters. Both are written
to a temporary name and renamed into place; the JSON is written last, so a checkpoint counts
only once both are complete. Older checkpoints beyond ``keep`` are removed after a new one is
complete.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import MeanFlowError

FORMAT = "meanflow-checkpoint-1"


def _atomic_json(path: str, payload: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and JSON-able hyper-parameters."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> str:
    """Write ``step-XXXXXXXX.{safetensors,json}`` atomically; prune all but the newest ``keep``."""
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"step-{step:08d}")
    tmp = stem + ".safetensors.tmp"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it count
            os.fsync(f.fileno())
        os.replace(tmp, stem + ".safetensors")
        _atomic_json(stem + ".json", {"format": FORMAT, "step": step, **meta})
    except OSError as exc:
        for path in (tmp, stem + ".json.tmp"):
            if os.path.exists(path):
                os.remove(path)
        raise MeanFlowError(
            f"could not write the checkpoint of step {step} in {directory} "
            f"({exc.strerror or exc}); the earlier checkpoints are kept; fix "
            "the cause and rerun the same command to resume"
        ) from None
    for old in list_checkpoints(directory)[:-keep]:
        for ext in (".json", ".safetensors"):
            if os.path.exists(old + ext):
                os.remove(old + ext)
    return stem


def list_checkpoints(directory: str) -> list[str]:
    """Stems of complete checkpoints (both files present), oldest first."""
    stems = sorted(p[:-5] for p in glob.glob(os.path.join(directory, "step-*.json")))
    return [s for s in stems if os.path.exists(s + ".safetensors")]


def read_meta(stem: str) -> dict[str, Any]:
    """The JSON half of a checkpoint; a damaged file gives one clear error naming it."""
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise MeanFlowError(f"checkpoint {stem}.json is unreadable or corrupt ({exc})") from None
    if meta.get("format") != FORMAT:
        raise MeanFlowError(
            f"{stem}.json is not a meanflow checkpoint (format "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    return meta


def load_checkpoint(
    stem: str, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one checkpoint; a damaged file gives one clear error naming it. With
    ``tensors=False`` the safetensors file is only checked (header and size), not loaded, and
    ``{}`` is returned in its place."""
    meta = read_meta(stem)
    try:
        if not tensors:
            with safe_open(stem + ".safetensors", "pt"):
                return {}, meta
        return load_file(stem + ".safetensors"), meta
    except (OSError, SafetensorError, ValueError) as exc:
        raise MeanFlowError(
            f"checkpoint {stem}.safetensors is unreadable or corrupt ({exc})"
        ) from None


def latest_checkpoint(run_dir: str) -> str:
    stems = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not stems:
        raise MeanFlowError(
            f"no checkpoint in {run_dir}/checkpoints; is {run_dir!r} a run "
            "directory written by 'meanflow train'?"
        )
    return stems[-1]


def load_latest_good(
    run_dir: str, tensors: bool = True
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` that loads, as ``(stem, tensors, meta)``. A damaged
    newer one is reported (one line on stderr naming it) and the previous one is used; when none
    loads, the newest one's error is raised. ``tensors=False``: see :func:`load_checkpoint`."""
    stems = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not stems:
        latest_checkpoint(run_dir)  # raises the "no checkpoint" error
    errors = []
    for stem in reversed(stems):
        try:
            loaded, meta = load_checkpoint(stem, tensors)
        except MeanFlowError as exc:
            errors.append(exc)
            continue
        for error in errors:
            print(
                f"meanflow: warning: {error}; using the older {os.path.basename(stem)}",
                file=sys.stderr,
            )
        return stem, loaded, meta
    more = f" (the {len(errors) - 1} older ones fail too)" if len(errors) > 1 else ""
    raise MeanFlowError(f"{errors[0]}{more}")


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
