"""``meanflow eval``: sample a run and print one JSON line with metric values and every setting
that affects them (see docs/evaluation.md). The protocol itself is
:func:`meanflow.eval.run_eval.evaluate_run`; this module only parses the options."""

from __future__ import annotations

import json

from ..eval.distances import DEFAULT_PROJECTIONS
from ..eval.protocol import DEFAULT_CACHE
from ..eval.run_eval import IMAGE_METRICS, evaluate_run
from .options import weights_option


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


def cmd_eval(args) -> int:
    cache = args.cache_dir or DEFAULT_CACHE
    result = evaluate_run(
        args.run,
        args.reference,
        steps=args.steps,
        schedule=args.schedule,
        num=args.num,
        seed=args.seed,
        metrics=args.metric,
        projections=args.projections,
        weights=weights_option(args),
        device=args.device,
        vae=args.vae,
        features=args.features,
        inception_weights=args.inception_weights,
        classes=args.classes,
        guidance=args.guidance,
        cache_dir=None if cache.lower() == "none" else cache,
        progress=not args.quiet,
    )
    print(json.dumps(result))
    return 0


__all__ = ["add_eval_parser", "cmd_eval", "IMAGE_METRICS"]
