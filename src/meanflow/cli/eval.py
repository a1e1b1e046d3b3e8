"""``meanflow eval``: sample a run and print one JSON line with metric values and every setting
that affects them (see docs/evaluation.md)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import check, plural
from ..eval.distances import DEFAULT_PROJECTIONS

if TYPE_CHECKING:
    from ..eval.features import FeatureNet
    from ..eval.inception import InceptionFeatures

IMAGE_METRICS = ("fd", "fid", "pr", "swd")


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare samples with reference data (FD, FID, precision/recall, SWD)",
        description="Sample a run (the primary EMA unless --weights) and "
        "print one JSON line with the metrics against a reference "
        "set, their floor (training data against the same "
        "reference), and the settings that produced them.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory from train")
    p.add_argument(
        "--reference",
        required=True,
        metavar="NAME_OR_PATH",
        help="built-in distribution (fresh draws, independent of the training set), "
        "a .npy/.npz file of reference points, or for image runs an image "
        "dataset or folder (fashion-mnist and cifar10: their test split)",
    )
    p.add_argument("--steps", type=int, default=1, metavar="K", help="sampling steps (default 1)")
    p.add_argument(
        "--schedule",
        metavar="T0,T1,...",
        help="explicit decreasing times, e.g. 1,0.6,0 (overrides --steps)",
    )
    p.add_argument(
        "--num",
        type=int,
        default=5000,
        metavar="N",
        help="samples drawn, and reference points drawn for a built-in (default 5000)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument(
        "--projections",
        type=int,
        default=DEFAULT_PROJECTIONS,
        metavar="P",
        help=f"random projections for SWD (default {DEFAULT_PROJECTIONS})",
    )
    p.add_argument(
        "--weights",
        metavar="NAME",
        help="which weights: ema (default: the primary EMA), raw, or an extra EMA "
        "of the run (ema_extra) by decay or name, e.g. 0.99995 or ema-0.99995",
    )
    p.add_argument("--raw", action="store_true", help="the raw weights (= --weights raw)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="runs trained on latents: the diffusers VAE "
        "directory to decode with (default: the one the latents were encoded with)",
    )
    p.add_argument(
        "--metric",
        default=None,
        metavar="M[,M]",
        help="image runs: fd (Frechet distance in the feature network's space), fid "
        "(Frechet distance of Inception-v3 features, needs meanflow[fid] and "
        "local weights), pr (precision/recall, density/coverage), swd (pixel-"
        "space SWD and energy distance); default fd,pr (vector runs always "
        "report swd and energy)",
    )
    p.add_argument(
        "--features",
        metavar="NAME_OR_FILE",
        help="feature network for fd/pr: a shipped one (fashion-mnist, digits), a "
        "file from 'meanflow features train', or 'inception' (default: the one "
        "named like the run's data)",
    )
    p.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth for fid "
        "(default: $MEANFLOW_INCEPTION_WEIGHTS, then torch-fidelity's cache); "
        "never downloaded",
    )
    p.add_argument(
        "--class",
        dest="classes",
        metavar="LABELS",
        help="labels to sample a conditional run with, as for 'meanflow sample' "
        "(default: cycle through all classes)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        metavar="W",
        help="classifier-free guidance at sampling time on top of the trained "
        "model: u_null + W (u_y - u_null); W != 1 costs two evaluations per "
        "step (default 1: the model as trained, one evaluation)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where reference features are cached (default ~/.cache/meanflow/reference"
        "; 'none' disables the cache)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def _extractors(args, run, metrics: tuple[str, ...], device) -> dict:
    """Feature networks by role: ``fd`` (also used for pr) and ``fid``, each (module, meta)."""
    from ..eval.features import load_feature_net
    from ..eval.inception import load_inception

    out: dict[str, tuple[FeatureNet | InceptionFeatures, dict]] = {}
    if "fid" in metrics or (args.features == "inception" and ("fd" in metrics or "pr" in metrics)):
        check(
            run.sample_shape[0] in (1, 3),
            f"Inception takes grey or RGB images; this run "
            f"generates {run.sample_shape} (latents need their VAE: the encode's --vae "
            "directory must exist here)",
        )
        inception = load_inception(args.inception_weights)
        if "fid" in metrics:
            out["fid"] = inception
        if args.features == "inception":
            out["fd"] = inception
    if ("fd" in metrics or "pr" in metrics) and "fd" not in out:
        out["fd"] = load_feature_net(args.features or run.config.data)
    for net, _ in out.values():
        net.to(device)
    return out


def cmd_eval(args) -> int:
    from ..data import TOY_DATASETS, load_vectors
    from ..eval import energy_distance, sliced_wasserstein
    from ..flow.sampling import parse_schedule
    from ..runs.load import load_run
    from ..runs.run import parse_classes
    from ..runtime.devices import resolve_device
    from .options import weights_option

    check(args.num >= 2, f"--num must be >= 2 (a covariance needs two samples), got {args.num}")
    check(args.projections >= 1, f"--projections must be >= 1, got {args.projections}")
    device = resolve_device(args.device)
    run = load_run(args.run, weights_option(args), device, vae=args.vae)
    metrics = tuple(
        m.strip() for m in (args.metric or ("fd,pr" if run.is_image else "swd")).split(",")
    )
    unknown = [m for m in metrics if m not in IMAGE_METRICS]
    check(not unknown, f"unknown --metric {', '.join(unknown)}; use fd, fid, pr and/or swd")
    check(
        run.is_image or metrics == ("swd",),
        "fd, fid and pr need an image run; vector runs report swd and energy distance",
    )
    check(
        "pr" not in metrics or args.num > 3,
        f"too few samples: pr needs --num > 3 (recall "
        f"uses each sample's 3 nearest neighbours), got {args.num}",
    )
    labels = parse_classes(args.classes, args.num, run, args.seed)
    schedule = parse_schedule(args.schedule)
    sampling = dict(
        steps=args.steps,
        schedule=schedule,
        seed=args.seed,
        device=device,
        labels=labels,
        guidance=args.guidance,
    )
    result = {}
    reference: Any  # precomputed statistics (a dict), reference images or reference vectors
    if run.is_image:
        reference = _reference_stats(args.reference)
        check(
            reference is None or metrics == ("fid",),
            "a reference of precomputed statistics"
            " (mu, sigma) gives fid only; use --metric fid, or a dataset or folder of images",
        )
        reference = reference or _image_reference(args.reference, run)
        extractors = _extractors(args, run, metrics, device)
    elif args.reference in TOY_DATASETS:
        reference = load_vectors(args.reference, num=args.num, seed=10_000 + args.seed)
    else:
        reference = load_vectors(args.reference)
    if run.is_image and extractors:
        result.update(_feature_metrics(args, run, metrics, extractors, reference, sampling))
        samples = result.pop("_samples")
    else:
        samples = _sample(run, args.num, not args.quiet, sampling)
    if "swd" in metrics:
        flat, ref = samples.reshape(args.num, -1), reference.reshape(len(reference), -1)
        ref = ref.numpy() if hasattr(ref, "numpy") else ref
        check(
            ref.shape[1] == flat.shape[1],
            f"the reference has "
            f"{plural(ref.shape[1], 'dimension')} but the run samples {flat.shape[1]}; "
            "compare with data of the same shape",
        )
        result["swd"] = sliced_wasserstein(flat, ref, projections=args.projections)
        result["energy_distance"] = energy_distance(flat, ref)
        result["projections"] = args.projections
    steps = len(schedule) - 1 if schedule else args.steps
    nfe = steps * (1 if args.guidance == 1 or run.config.guidance.inputs else 2)
    print(
        json.dumps(
            {
                **result,
                "steps": steps,
                "schedule": schedule,
                "num": args.num,
                "nfe": nfe,
                "guidance": args.guidance,
                "trained_guidance": run.trained_scale,
                "classes": _label_set(labels),
                "reference": args.reference,
                "reference_num": _count(reference),
                "weights": run.weights,
                "seed": args.seed,
                "checkpoint_step": run.step,
            }
        )
    )
    return 0


def _sample(run, num: int, progress: bool, sampling: dict) -> np.ndarray:
    """``run.sample(num, **sampling)`` with a progress bar on stderr."""
    import torch
    from tqdm import tqdm

    chunks = []
    with tqdm(
        total=num, disable=not progress, unit="sample", desc="sampling", dynamic_ncols=True
    ) as bar:
        for chunk in run.iter_samples(num, **sampling):
            chunks.append(chunk)
            bar.update(len(chunk))
    return torch.cat(chunks).numpy().astype(np.float32)


def _label_set(labels):
    return None if labels is None else sorted(set(labels.tolist()))


def _inception_info(meta: dict) -> dict:
    return {k: meta[k] for k in ("weights", "fingerprint", "library")}


def _count(reference) -> int | None:
    return reference.get("count") if isinstance(reference, dict) else int(len(reference))


def _reference_stats(path: str) -> dict | None:
    """Precomputed FID statistics: a ``.npz`` holding ``mu`` (d,) and ``sigma`` (d, d) (the
    layout of ADM's reference batches and of pytorch-fid's stats files, optional ``count``),
    or None when ``path`` is not such a file."""
    import zipfile

    from ..data.arrays import check_numpy_header, read_error

    if not (path.endswith(".npz") and os.path.isfile(path)):
        return None
    check_numpy_header(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if not {"mu", "sigma"} <= set(f.files):
                return None
            count = int(f["count"]) if "count" in f.files else None
            return {
                "mu": f["mu"].astype(np.float64),
                "sigma": f["sigma"].astype(np.float64),
                "count": count,
            }
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise read_error(path, exc) from None


def _feature_metrics(args, run, metrics, extractors, reference, sampling) -> dict:
    """fd / pr in the ``fd`` extractor's space, fid in Inception's, with floors; the samples
    under ``_samples`` when swd needs them."""
    from ..data import open_data
    from ..eval.frechet import FeatureStats, frechet_distance
    from ..eval.protocol import DEFAULT_CACHE, image_metrics, sample_features

    cache = None if (args.cache_dir or "").lower() == "none" else (args.cache_dir or DEFAULT_CACHE)
    nets = {role: net for role, (net, _) in extractors.items()}
    fake, samples = sample_features(
        run, nets, args.num, keep_images="swd" in metrics, progress=not args.quiet, **sampling
    )
    if isinstance(reference, dict):  # precomputed statistics: fid only, no floor
        stats = FeatureStats().update(fake["fid"])
        meta = extractors["fid"][1]
        return {
            "_samples": samples,
            "fid": frechet_distance(reference["mu"], reference["sigma"], stats.mean, stats.cov),
            "fid_floor": None,
            "inception": _inception_info(meta),
        }
    cfg = run.config
    if run.latents:  # the images the latents were encoded from, cropped as then
        from ..data.encode import cropped_images

        train_images = cropped_images(
            run.latents["source"], run.sample_shape[-1], args.num, args.seed
        )
    else:
        train_data = open_data(cfg.data, directory=cfg.data_dir, size=cfg.image_size)
        assert train_data.x is not None  # open_data holds the images in memory
        train_images = train_data.x
    label = f"{args.reference}-{cfg.image_size}"
    result: dict = {"_samples": samples}
    for role, (net, meta) in extractors.items():
        wanted = ("fd",) if role == "fid" else tuple(m for m in metrics if m in ("fd", "pr"))
        values = image_metrics(
            fake[role],
            reference,
            train_images,
            net,
            meta,
            wanted,
            label,
            cache,
            progress=not args.quiet,
        )
        if role == "fid":
            values = {k.replace("fd", "fid", 1): v for k, v in values.items()}
            result["inception"] = _inception_info(meta)
        else:
            result["features"] = {
                "name": args.features or cfg.data,
                "fingerprint": meta["fingerprint"],
                "test_accuracy": meta.get("test_accuracy"),
            }
        result.update(values)
    return result


def _image_reference(name: str, run):
    """Reference images (N, C, H, W) of an image run: the test split of fashion-mnist and
    cifar10, the whole set otherwise."""
    from ..data import check_same_classes, open_data

    cfg = run.config
    same = name == cfg.data
    split = "test" if name in ("fashion-mnist", "cifar10") else "train"
    if run.latents:  # a folder of images, cropped as the encoded ones were
        from ..data.encode import cropped_images

        return cropped_images(name, run.sample_shape[-1])  # (n, 3, S, S), as decoded
    ref = open_data(name, directory=cfg.data_dir if same else "", size=cfg.image_size, split=split)
    check(
        ref.shape == run.shape,
        f"reference {name!r} holds samples of shape {ref.shape}, the "
        f"run generates {run.shape}; use reference data of the same size",
    )
    if run.num_classes:
        check_same_classes(run.class_names, ref.class_names, f"reference {name!r}")
    return ref.x


__all__ = ["add_eval_parser", "cmd_eval", "IMAGE_METRICS"]
