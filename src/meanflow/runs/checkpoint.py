"""Checkpoints: tensors in safetensors, everything else in JSON. Nothing is pickled, so loading
a checkpoint never executes code.

A checkpoint ``step-00001000`` is two files in ``RUN/checkpoints/``: ``.safetensors`` with
``model.*``, ``ema.*`` (the primary EMA; extras ``ema-<decay>.*``, named under ``emas`` in the
JSON), ``optim.<param index>.<state name>``, ``rng.*`` and ``data.*`` tensors, and ``.json``
with the step, config, optimizer hyper-parameters and counters. Both are written
to a temporary name and renamed into place; the JSON is written last, so a checkpoint counts
only once both are complete.

**Verified checkpoints.** The JSON records the SHA-256 and the size of the safetensors file as
it was flushed to disk (``sha256``, ``bytes``); loading recomputes them, so a truncated or
altered file is caught even when its header still parses. A checkpoint written before the
checksum existed is *unverified but readable*: it loads when its safetensors header is sound.
:func:`load_latest_good` uses the newest checkpoint that passes, with one warning line (once
per process, on rank 0) naming those that did not. Retention (``keep``) runs after a new
checkpoint is written and verified: walking from the newest, it keeps the first ``keep``
checkpoints that pass, sets aside the corrupt ones it meets (renamed ``*.corrupt``) and only
then deletes the older ones, so the newest good checkpoint is never deleted.
"""

from __future__ import annotations

import glob
import hashlib
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


class CorruptCheckpoint(MeanFlowError):
    """A checkpoint whose files are damaged (checksum, size, header or JSON), as opposed to one
    that cannot be read for another reason (permissions, another format)."""


# safetensors path -> (size, mtime in ns) of files whose checksum matched in this process
_VERIFIED: dict[str, tuple[int, int]] = {}
_WARNED: set[tuple[str, ...]] = set()  # the fallback warnings already printed
_CHUNK = 1 << 22


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def save_checkpoint(
    directory: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> str:
    """Write ``step-XXXXXXXX.{safetensors,json}`` atomically, the JSON holding the checksum of
    the safetensors file; then apply retention (module docstring) to keep the newest ``keep``."""
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"step-{step:08d}")
    tmp = stem + ".safetensors.tmp"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it count
            os.fsync(f.fileno())
        digest, size = file_sha256(tmp), os.path.getsize(tmp)
        os.replace(tmp, stem + ".safetensors")
        _atomic_json(
            stem + ".json",
            {"format": FORMAT, "step": step, **meta, "sha256": digest, "bytes": size},
        )
    except OSError as exc:
        for path in (tmp, stem + ".json.tmp"):
            if os.path.exists(path):
                os.remove(path)
        raise MeanFlowError(
            f"could not write the checkpoint of step {step} in {directory} "
            f"({exc.strerror or exc}); the earlier checkpoints are kept; fix "
            "the cause and rerun the same command to resume"
        ) from None
    _VERIFIED[stem + ".safetensors"] = _identity(stem + ".safetensors")
    retain(directory, keep)
    return stem


def retain(directory: str, keep: int) -> list[str]:
    """Keep the newest ``keep`` checkpoints of ``directory`` that pass :func:`verify`; set
    aside the corrupt ones met on the way and delete those older than the ``keep``-th good one.
    Nothing is deleted unless the newest checkpoint passes. Returns the stems kept."""
    kept: list[str] = []
    stems = list_checkpoints(directory)
    for stem in reversed(stems):
        if len(kept) >= max(1, keep):
            for ext in (".json", ".safetensors"):
                if os.path.exists(stem + ext):
                    os.remove(stem + ext)
            continue
        try:
            verify(stem)
        except CorruptCheckpoint:
            set_aside(stem)
            continue
        except MeanFlowError:
            if not kept:  # the newest is unreadable for another reason: delete nothing
                return stems
            continue
        kept.append(stem)
    return kept


def set_aside(stem: str) -> None:
    """Rename a damaged checkpoint's files to ``*.corrupt``, out of every listing but kept for
    inspection."""
    for ext in (".safetensors", ".json"):
        if os.path.exists(stem + ext):
            os.replace(stem + ext, stem + ext + ".corrupt")
    _VERIFIED.pop(stem + ".safetensors", None)


def list_checkpoints(directory: str) -> list[str]:
    """Stems of complete checkpoints (both files present), oldest first."""
    stems = sorted(p[:-5] for p in glob.glob(os.path.join(directory, "step-*.json")))
    return [s for s in stems if os.path.exists(s + ".safetensors")]


def read_meta(stem: str) -> dict[str, Any]:
    """The JSON half of a checkpoint; a damaged file gives one clear error naming it."""
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"checkpoint {stem}.json is corrupt ({exc})") from None
    except OSError as exc:
        raise MeanFlowError(f"checkpoint {stem}.json is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise MeanFlowError(
            f"{stem}.json is not a meanflow checkpoint (format {found!r}, expected {FORMAT!r})"
        )
    return meta


def verify(stem: str, meta: dict[str, Any] | None = None) -> bool:
    """Check a checkpoint's safetensors file against its JSON: size and SHA-256 when recorded
    (True: verified), else only its header (False: an older checkpoint, unverified but
    readable). Raises :class:`CorruptCheckpoint` naming the file when it fails."""
    meta = read_meta(stem) if meta is None else meta
    path = stem + ".safetensors"
    try:
        identity = _identity(path)
        if "sha256" not in meta:
            with safe_open(path, "pt"):
                return False
        if _VERIFIED.get(path) == identity:
            return True
        if identity[0] != meta.get("bytes", identity[0]):
            raise CorruptCheckpoint(
                f"checkpoint {path} is corrupt (truncated or altered: {identity[0]} bytes, "
                f"{meta['bytes']} written)"
            )
        if file_sha256(path) != meta["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt (its SHA-256 does not match)")
    except (SafetensorError, ValueError) as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable or corrupt ({exc})") from None
    except OSError as exc:
        raise MeanFlowError(f"checkpoint {path} is unreadable ({exc})") from None
    _VERIFIED[path] = identity
    return True


def load_checkpoint(
    stem: str, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one checkpoint after :func:`verify`; a damaged file gives one clear error naming
    it. With ``tensors=False`` the files are only checked, and ``{}`` is returned in place of
    the tensors."""
    meta = read_meta(stem)
    verify(stem, meta)
    if not tensors:
        return {}, meta
    try:
        return load_file(stem + ".safetensors"), meta
    except (SafetensorError, ValueError) as exc:
        raise CorruptCheckpoint(
            f"checkpoint {stem}.safetensors is unreadable or corrupt ({exc})"
        ) from None
    except OSError as exc:
        raise MeanFlowError(f"checkpoint {stem}.safetensors is unreadable ({exc})") from None


def latest_checkpoint(run_dir: str) -> str:
    stems = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not stems:
        raise MeanFlowError(
            f"no checkpoint in {run_dir}/checkpoints; is {run_dir!r} a run "
            "directory written by 'meanflow train'?"
        )
    return stems[-1]


def find_latest_good(
    run_dir: str, tensors: bool = True
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Like :func:`load_latest_good`, and also the stems of the newer checkpoints found
    corrupt (for the trainer to :func:`set_aside`)."""
    stems = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not stems:
        latest_checkpoint(run_dir)  # raises the "no checkpoint" error
    errors: list[MeanFlowError] = []
    corrupt: list[str] = []
    for stem in reversed(stems):
        try:
            loaded, meta = load_checkpoint(stem, tensors)
        except MeanFlowError as exc:
            errors.append(exc)
            if isinstance(exc, CorruptCheckpoint):
                corrupt.append(stem)
            continue
        _warn_once(errors, os.path.basename(stem))
        return stem, loaded, meta, corrupt
    more = f" (the {len(errors) - 1} older ones fail too)" if len(errors) > 1 else ""
    raise MeanFlowError(f"{errors[0]}{more}")


def _warn_once(errors: list[MeanFlowError], used: str) -> None:
    """One stderr line naming the failed checkpoints and the one used: once per process for
    the same outcome (the command line and the trainer both look), and only on rank 0 (torchrun's
    ``RANK``)."""
    key = (*map(str, errors), used)
    if not errors or key in _WARNED or os.environ.get("RANK", "0") not in ("", "0"):
        return
    _WARNED.add(key)
    print(
        f"meanflow: warning: {'; '.join(map(str, errors))}; using the older {used}",
        file=sys.stderr,
    )


def load_latest_good(
    run_dir: str, tensors: bool = True
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` that loads and passes :func:`verify`, as
    ``(stem, tensors, meta)``. Damaged newer ones are reported in one warning line and the
    previous one is used; when none loads, the newest one's error is raised. Nothing in the run
    directory is changed. ``tensors=False``: see :func:`load_checkpoint`."""
    stem, loaded, meta, _ = find_latest_good(run_dir, tensors)
    return stem, loaded, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
