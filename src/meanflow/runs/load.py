"""Reading a model back: a ``meanflow train`` run directory (its newest good checkpoint) or a
folder written by ``meanflow export`` (local, or fetched from the Hugging Face Hub)."""

from __future__ import annotations

import os

import torch

from ..config.schema import TrainConfig
from ..errors import check
from .checkpoint import load_latest_good, prefixed
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, _hub_folder, is_pretrained, load_folder
from .run import Normalizer, TrainedRun, assemble_run, weights_name


def load_run(
    run_dir: str, weights: str = "ema", device: torch.device | str = "cpu", vae: str | None = None
) -> TrainedRun:
    """Load the newest good checkpoint of a ``meanflow train`` run directory (or the model of
    a folder written by ``meanflow export``, :func:`meanflow.from_pretrained`).

    Args:
        run_dir: the run directory (``--out`` of ``meanflow train``).
        weights: ``"ema"`` (default: the primary EMA, what ``meanflow sample`` uses),
            ``"raw"``, or an extra EMA of the run (``ema_extra``) by name or decay:
            ``"ema-0.99995"`` or ``"0.99995"``.
        device: where to put the network: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or
            ``"auto"`` (cuda if available); :meth:`TrainedRun.sample` samples there.
        vae: for a run trained on latents, the VAE directory to decode with (default: the one
            recorded when the latents were encoded); samples are then images.
    """
    check(os.path.isdir(run_dir), f"run directory {run_dir!r} does not exist")
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")) and is_pretrained(run_dir):
        run = load_folder(run_dir, device, vae)  # an exported model: one set of weights
        check(
            weights in ("ema", run.weights),
            f"{run_dir!r} is an exported model with the "
            f"weights {run.weights!r} only; drop --weights/--raw",
        )
        return run
    _, tensors, meta = load_latest_good(run_dir)
    cfg = TrainConfig.from_dict(meta["config"])
    weights = weights_name(weights, meta.get("emas") or {"ema": cfg.ema_decay}, run_dir)
    return assemble_run(
        cfg,
        tuple(meta["shape"]) if "shape" in meta else (int(meta["dim"]),),
        prefixed(tensors, "model" if weights == "raw" else weights),
        Normalizer(tensors["data.mean"], tensors["data.std"]),
        int(meta["step"]),
        weights,
        class_names=meta.get("class_names"),
        latents=meta.get("latents"),
        device=device,
        vae=vae,
        mismatch=f"checkpoint of {run_dir!r} does not match its configured network",
    )


def from_pretrained(
    path: str,
    device: torch.device | str = "cpu",
    vae: str | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
) -> TrainedRun:
    """Load a model written by :func:`save_pretrained` (or ``meanflow export``) as a
    :class:`~meanflow.runs.run.TrainedRun`, in eval mode on ``device``.

    ``path`` is a local folder; a training run directory is read with
    :func:`~meanflow.runs.run.load_run`. Anything else is taken as a Hugging Face Hub
    repository id and fetched with ``huggingface_hub.snapshot_download`` (``revision``; with
    ``local_files_only`` only its cache is used). ``vae``: for a latent model, the diffusers VAE
    folder to decode with (default: the one recorded)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return load_run(path, device=device, vae=vae)
    if not os.path.isdir(path):
        path = _hub_folder(path, local_files_only, revision)
    check(
        is_pretrained(path),
        f"{path!r} holds no exported model ({CONFIG_NAME} and "
        f"{WEIGHTS_NAME}); write one with `meanflow export --run RUN --out {path}`",
    )
    return load_folder(path, device, vae)
