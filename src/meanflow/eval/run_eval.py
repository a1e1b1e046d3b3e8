"""The evaluation protocol as one library call: :func:`evaluate_run` samples a trained run and
measures the samples against reference data, returning the dict ``meanflow eval`` prints as
JSON (see docs/evaluation.md). The command line, the Python API and the ablation studies all
call it in-process.

What is measured:

- vector runs: the sliced Wasserstein distance SWD = E_w [W_1(<w, x>, <w, y>)] over random
  unit directions w, and the energy distance 2 E|x - y| - E|x - x'| - E|y - y'|, between
  ``num`` samples x and the reference points y;
- image runs, in a feature network's space phi (``fd`` / ``pr``; Inception-v3 for ``fid``):
  the Frechet distance |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)), precision /
  recall (k = 3) and density / coverage (k = 5); each with its floor, the same metric between
  as many training images and the reference; ``swd``: SWD and energy distance in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import check, plural
from ..flow.sampling import parse_schedule
from ..runs.load import load_run
from ..runs.run import Classes, TrainedRun, parse_classes
from ..runtime.devices import resolve_device
from .distances import DEFAULT_PROJECTIONS, energy_distance, sliced_wasserstein
from .features import load_feature_net
from .frechet import FeatureStats, frechet_distance
from .inception import load_inception
from .protocol import DEFAULT_CACHE, image_metrics, sample_features
from .references import (
    check_reference,
    image_reference,
    reference_count,
    reference_stats,
    training_images,
    vector_reference,
)

IMAGE_METRICS = ("fd", "fid", "pr", "swd")


def evaluate_run(
    run: str | TrainedRun,
    reference: str,
    *,
    steps: int = 1,
    schedule: str | Sequence[float] | None = None,
    num: int = 5000,
    seed: int = 0,
    metrics: str | Sequence[str] | None = None,
    projections: int = DEFAULT_PROJECTIONS,
    weights: str | None = None,
    device: str | torch.device | None = None,
    vae: str | None = None,
    features: str | None = None,
    inception_weights: str | None = None,
    classes: Classes = None,
    guidance: float = 1.0,
    cache_dir: str | None = DEFAULT_CACHE,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample ``run`` and measure the samples against ``reference``.

    Args:
        run: a run directory of ``meanflow train`` (or an exported model folder), or a loaded
            :class:`~meanflow.runs.run.TrainedRun` (then ``weights``, ``device`` and ``vae``
            are the run's own and must be left out).
        reference: see :mod:`meanflow.eval.references`: a built-in distribution or a .npy/.npz
            of points for vector runs; an image dataset, a folder, or precomputed statistics
            for image runs.
        steps, schedule: sampling steps, or explicit decreasing times (``"1,0.6,0"`` or a
            list; overrides ``steps``).
        num: samples drawn (and reference points drawn from a built-in distribution).
        seed: noise seed; a built-in reference is drawn with ``10000 + seed``.
        metrics: image runs: any of ``fd``, ``fid``, ``pr``, ``swd`` (a list or ``"fd,pr"``,
            the default); vector runs: ``swd`` only (the default), with the energy distance.
        projections: random projections for SWD.
        weights: ``"ema"`` (default), ``"raw"``, or an extra EMA by name or decay.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        vae: runs trained on latents: the VAE folder to decode with.
        features: the feature network for fd/pr: a shipped one, a file, or ``"inception"``
            (default: the one named like the run's data).
        inception_weights: torch-fidelity's Inception weights file for ``fid``.
        classes: labels to sample a conditional run with (default: cycle through classes).
        guidance: classifier-free guidance scale at sampling time (1: the model as trained).
        cache_dir: where reference features are cached; None: no cache.
        progress: progress bars on stderr.

    Returns:
        The metric values with every setting that produced them: ``swd``,
        ``energy_distance``, ``projections`` / ``fd``, ``precision``, ... and their
        ``*_floor``; ``steps``, ``schedule``, ``num``, ``nfe``, ``guidance``,
        ``trained_guidance``, ``classes``, ``reference``, ``reference_num``, ``weights``,
        ``seed``, ``checkpoint_step``.
    """
    check(num >= 2, f"--num must be >= 2 (a covariance needs two samples), got {num}")
    check(projections >= 1, f"--projections must be >= 1, got {projections}")
    if isinstance(run, TrainedRun):
        given = [n for n, v in (("weights", weights), ("device", device), ("vae", vae)) if v]
        check(
            not given,
            f"{', '.join(given)} apply when loading a run; pass them to load_run, or give "
            "evaluate_run the run directory",
        )
        device = run.device
    else:
        device = resolve_device(str(device or "auto"))
        run = load_run(run, weights or "ema", device, vae=vae)
    wanted = _metrics(metrics, run, num)
    labels = parse_classes(classes, num, run, seed)
    times = parse_schedule(schedule) if isinstance(schedule, str) else _times(schedule)
    sampling = dict(
        steps=steps, schedule=times, seed=seed, device=device, labels=labels, guidance=guidance
    )
    check_reference(reference, run)
    result: dict[str, Any] = {}
    ref: Any  # precomputed statistics (a dict), reference images or reference points
    if run.is_image:
        ref = reference_stats(reference)
        check(
            ref is None or wanted == ("fid",),
            "a reference of precomputed statistics"
            " (mu, sigma) gives fid only; use --metric fid, or a dataset or folder of images",
        )
        ref = ref or image_reference(reference, run)
        nets = _extractors(run, wanted, features, inception_weights, device)
    else:
        ref, nets = vector_reference(reference, num, seed), {}
    if nets:  # fd, pr or fid: features of the samples, computed batch by batch
        result = _feature_metrics(
            run, wanted, nets, ref, sampling, num, seed, progress, features, reference, cache_dir
        )
        samples = result.pop("_samples")
    else:
        samples = _sample(run, num, progress, sampling)
    if "swd" in wanted:
        result.update(_distances(samples, ref, num, projections))
    k = len(times) - 1 if times else steps
    return {
        **result,
        "steps": k,
        "schedule": times,
        "num": num,
        "nfe": k * (1 if guidance == 1 or run.config.guidance.inputs else 2),
        "guidance": guidance,
        "trained_guidance": run.trained_scale,
        "classes": None if labels is None else sorted(set(labels.tolist())),
        "reference": reference,
        "reference_num": reference_count(ref),
        "weights": run.weights,
        "seed": seed,
        "checkpoint_step": run.step,
    }


def _times(schedule: Sequence[float] | None) -> list[float] | None:
    return None if schedule is None else [float(t) for t in schedule]


def _metrics(metrics: str | Sequence[str] | None, run: TrainedRun, num: int) -> tuple[str, ...]:
    """The metrics asked for (default: fd, pr for image runs, swd for vector runs), checked."""
    if metrics is None:
        metrics = "fd,pr" if run.is_image else "swd"
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    wanted = tuple(m.strip() for m in items)
    unknown = [m for m in wanted if m not in IMAGE_METRICS]
    check(not unknown, f"unknown --metric {', '.join(unknown)}; use fd, fid, pr and/or swd")
    check(
        run.is_image or wanted == ("swd",),
        "fd, fid and pr need an image run; vector runs report swd and energy distance",
    )
    check(
        "pr" not in wanted or num > 3,
        f"too few samples: pr needs --num > 3 (recall "
        f"uses each sample's 3 nearest neighbours), got {num}",
    )
    return wanted


def _distances(samples: np.ndarray, reference, num: int, projections: int) -> dict:
    """SWD and energy distance between the flattened samples and reference."""
    flat, ref = samples.reshape(num, -1), reference.reshape(len(reference), -1)
    ref = ref.numpy() if hasattr(ref, "numpy") else ref
    check(
        ref.shape[1] == flat.shape[1],
        f"the reference has "
        f"{plural(ref.shape[1], 'dimension')} but the run samples {flat.shape[1]}; "
        "compare with data of the same shape",
    )
    return {
        "swd": sliced_wasserstein(flat, ref, projections=projections),
        "energy_distance": energy_distance(flat, ref),
        "projections": projections,
    }


def _extractors(
    run: TrainedRun,
    metrics: tuple[str, ...],
    features: str | None,
    inception_weights: str | None,
    device,
) -> dict[str, tuple[Any, dict]]:
    """Feature networks by role: ``fd`` (also used for pr) and ``fid``, each (module, meta)."""
    out: dict[str, tuple[Any, dict]] = {}
    if "fid" in metrics or (features == "inception" and ("fd" in metrics or "pr" in metrics)):
        check(
            run.sample_shape[0] in (1, 3),
            f"Inception takes grey or RGB images; this run "
            f"generates {run.sample_shape} (latents need their VAE: the encode's --vae "
            "directory must exist here)",
        )
        inception = load_inception(inception_weights)
        if "fid" in metrics:
            out["fid"] = inception
        if features == "inception":
            out["fd"] = inception
    if ("fd" in metrics or "pr" in metrics) and "fd" not in out:
        out["fd"] = load_feature_net(features or run.config.data)
    for net, _ in out.values():
        net.to(device)
    return out


def _sample(run: TrainedRun, num: int, progress: bool, sampling: dict) -> np.ndarray:
    """``run.sample(num, **sampling)`` as float32, with a progress bar on stderr."""
    chunks = []
    with tqdm(
        total=num, disable=not progress, unit="sample", desc="sampling", dynamic_ncols=True
    ) as bar:
        for chunk in run.iter_samples(num, **sampling):
            chunks.append(chunk)
            bar.update(len(chunk))
    return torch.cat(chunks).numpy().astype(np.float32)


def _inception_info(meta: dict) -> dict:
    return {k: meta[k] for k in ("weights", "fingerprint", "library")}


def _feature_metrics(
    run: TrainedRun,
    metrics: tuple[str, ...],
    extractors: dict,
    ref,
    sampling: dict,
    num: int,
    seed: int,
    progress: bool,
    features: str | None,
    reference: str,
    cache_dir: str | None,
) -> dict:
    """fd / pr in the ``fd`` extractor's space, fid in Inception's, with floors; the samples
    under ``_samples`` (None unless swd needs them). ``ref``: reference images, or
    precomputed statistics (a dict) that give fid without a floor."""
    nets = {role: net for role, (net, _) in extractors.items()}
    fake, samples = sample_features(
        run, nets, num, keep_images="swd" in metrics, progress=progress, **sampling
    )
    if isinstance(ref, dict):
        stats = FeatureStats().update(fake["fid"])
        return {
            "_samples": samples,
            "fid": frechet_distance(ref["mu"], ref["sigma"], stats.mean, stats.cov),
            "fid_floor": None,
            "inception": _inception_info(extractors["fid"][1]),
        }
    train_images = training_images(run, num, seed)
    label = f"{reference}-{run.config.image_size}"
    result: dict = {"_samples": samples}
    for role, (net, meta) in extractors.items():
        wanted = ("fd",) if role == "fid" else tuple(m for m in metrics if m in ("fd", "pr"))
        values = image_metrics(
            fake[role], ref, train_images, net, meta, wanted, label, cache_dir, progress=progress
        )
        if role == "fid":
            values = {k.replace("fd", "fid", 1): v for k, v in values.items()}
            result["inception"] = _inception_info(meta)
        else:
            result["features"] = {
                "name": features or run.config.data,
                "fingerprint": meta["fingerprint"],
                "test_accuracy": meta.get("test_accuracy"),
            }
        result.update(values)
    return result


__all__ = ["evaluate_run", "IMAGE_METRICS"]
