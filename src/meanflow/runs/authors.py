"""The MeanFlow authors' released checkpoints as meanflow runs (``meanflow convert``).

* ``--from authors-jax``: a flax msgpack file of their JAX code (github.com/Gsunshine/meanflow):
  the ``checkpoint`` file inside an Orbax ``checkpoint_<step>/`` folder written with aggregated
  arrays (what ``flax.training.checkpoints.save_checkpoint_multiprocess`` does for host numpy
  arrays with orbax-checkpoint 0.4.x, their pinned version), or a legacy
  ``flax.serialization.to_bytes`` file. It is read here with a small msgpack decoder (numpy
  only; no jax, flax, orbax or msgpack package needed). Arrays stored by Tensorstore (zarr or
  OCDBT folders) are refused with a message: reading them needs tensorstore.
* ``--from authors-torch``: a py-meanflow checkpoint (github.com/Gsunshine/py-meanflow,
  ``checkpoint-last.pth``: ``{"model": MeanFlow.state_dict(), "optimizer", "lr_schedule",
  "epoch", "args"}``), read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, the
  type of ``args``, is the only class allowed besides tensors; it is read as a
  ``types.SimpleNamespace``).

The output is a run directory that ``meanflow sample --run`` reads (``config.json`` and
``checkpoints/step-N.{safetensors,json}``), or, for ``--out FILE.safetensors``, the EMA state
dict of our network alone.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..config.schema import TrainConfig
from ..errors import MeanFlowError, check
from ..nn import dit
from ..nn.convert import dit_spec, dit_state_dict, flatten_tree, load_strict, unet_state_dict
from ..nn.songunet import songunet, songunet_for_authors
from .checkpoint import save_checkpoint
from .flax_msgpack import read_flax_msgpack
from .run import Normalizer

SOURCES = ("authors-jax", "authors-torch")


def _step_of(name: str) -> int:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def find_jax_file(path: str) -> str:
    """The msgpack file to read for ``--checkpoint path`` (see the option's help)."""
    check(os.path.exists(path), f"--checkpoint {path!r} does not exist")
    if os.path.isfile(path):
        return path
    steps = [p for p in glob.glob(os.path.join(path, "checkpoint_*")) if _step_of(p) >= 0]
    if not os.path.exists(os.path.join(path, "checkpoint")) and steps:
        path = max(steps, key=_step_of)
        if os.path.isfile(path):
            return path
    names = set(os.listdir(path))
    tensorstore = (
        {"manifest.ocdbt", "d"} & names
        or any(n.startswith("ocdbt.process") for n in names)
        or glob.glob(os.path.join(path, "*", ".zarray"))
    )
    if tensorstore:
        raise MeanFlowError(
            f"{path!r} holds arrays written by Tensorstore (OCDBT or zarr: Orbax "
            "without aggregated arrays); reading them needs tensorstore, which "
            "meanflow does not use: restore it with orbax and save it with "
            "flax.serialization.to_bytes, then convert that file"
        )
    check(
        "checkpoint" in names,
        f"no 'checkpoint' file in {path!r}; give a checkpoint_<step> "
        "folder, its parent or a flax msgpack file",
    )
    return os.path.join(path, "checkpoint")


def _placeholders(tree: dict) -> list[str]:
    """Paths of the leaves Orbax left to Tensorstore (strings ``PLACEHOLDER://...``)."""
    return [
        path
        for path, leaf in flatten_tree(tree).items()
        if isinstance(leaf, str) and leaf.startswith("PLACEHOLDER")
    ]


def jax_params(tree: Any, weights: str) -> dict:
    """The DiT parameter tree (what their ``MeanFlow.net`` holds) of a restored checkpoint."""
    check(isinstance(tree, dict), "the msgpack file does not hold a dict of parameters")
    if "x_embedder" in tree:
        return tree
    if "net" in tree and isinstance(tree["net"], dict):
        return tree["net"]
    check(
        weights in tree,
        f"no {weights!r} in the checkpoint (top-level keys: "
        f"{', '.join(sorted(tree))}); try --weights params or ema_params",
    )
    node = tree[weights]
    node = node.get("params", node) if "net" not in node else node
    check(
        isinstance(node, dict) and isinstance(node.get("net"), dict),
        f"no {weights}/net in the checkpoint; is it one of the authors' JAX runs?",
    )
    return node["net"]


def load_torch(path: str) -> dict:
    """A py-meanflow checkpoint, loaded without running code."""
    check(os.path.isfile(path), f"--checkpoint {path!r} is not a file")
    try:
        # py-meanflow pickles its options as an argparse.Namespace: read as a SimpleNamespace
        with torch.serialization.safe_globals([(SimpleNamespace, "argparse.Namespace")]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeanFlowError(
            f"cannot load {path!r} with torch.load(weights_only=True): {first[:200]}"
        ) from None
    check(isinstance(obj, dict), f"{path!r} does not hold a dict")
    return obj


# ---------------------------------------------------------------------------------------------
# the conversion


def _jax_model(args: ConvertRequest, info: dict):
    file = find_jax_file(args.checkpoint)
    tree = read_flax_msgpack(file)
    stored = _placeholders(tree)
    check(
        not stored,
        f"{file!r} leaves {len(stored)} arrays to Tensorstore (e.g. "
        f"{stored[0] if stored else ''}); reading them needs tensorstore (see docs/convert.md)",
    )
    weights = args.weights or "ema_params"
    check(
        weights in ("ema_params", "params"),
        f"--weights for authors-jax is ema_params or params, got {weights!r}",
    )
    params = jax_params(tree, weights)
    spec = dit_spec(params)
    check(
        args.image_size % spec["patch"] == 0,
        f"--image-size {args.image_size} is not divisible by the patch size {spec['patch']}",
    )
    shape = (spec["in_channels"], args.image_size, args.image_size)
    nets = {}
    names = {
        "ema": weights,
        "model": "params" if weights == "ema_params" and "params" in tree else weights,
    }
    for role, key in names.items():
        p = params if key == weights else jax_params(tree, key)
        model = dit(
            spec["size"],
            input_size=args.image_size,
            in_channels=spec["in_channels"],
            num_classes=spec["num_classes"],
        )
        load_strict(model, dit_state_dict(p), f"the authors' DiT ({key})")
        nets[role] = model
    info.update(file=file, spec=spec, weights=names)
    step = tree.get("step")  # a dict: jax_params checked it
    info["step"] = int(np.asarray(step)) if step is not None else 0
    latents = {
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "vae": args.vae,
        "image_size": args.image_size * 8,
        "flips": False,
        "source": "authors-jax",
    }
    return nets, shape, spec["num_classes"], {"arch": "dit", "size": spec["size"]}, latents


def _torch_model(args: ConvertRequest, info: dict):
    obj = load_torch(args.checkpoint)
    state = obj.get("model", obj)
    check(
        isinstance(state, dict) and all(isinstance(k, str) for k in state),
        f"{args.checkpoint!r} holds no state dict (keys: {', '.join(map(str, obj))[:200]})",
    )
    prefixes = {k.split(".", 1)[0] for k in state if "." in k}
    weights = args.weights or ("net_ema1" if "net_ema1" in prefixes else "net_ema")
    check(
        weights in prefixes,
        f"--weights {weights!r} is not in the checkpoint; it holds {', '.join(sorted(prefixes))}",
    )
    # a run of model.size cifar10-paper always has the augmentation mapping (augment_dim 6);
    # a checkpoint trained without --use_edm_aug gets it as zeros (sampling passes no labels)
    with torch.device("meta"):
        paper = songunet("cifar10-paper")
        assert paper.map_augment is not None  # cifar10-paper has augment_dim 6
        aug_shape = paper.map_augment.weight.shape
    cfg_model: dict  # the model section of the run config, from songunet_for_authors
    nets, shape, cfg_model, added = {}, (3, 32, 32), {}, []
    for role, key in {"ema": weights, "model": "net" if "net" in prefixes else weights}.items():
        sd = unet_state_dict(state, key + ".")
        if "map_augment.weight" not in sd:
            sd["map_augment.weight"] = torch.zeros(aug_shape)
            added.append(f"{key}.map_augment.weight (zeros)")
        model, shape, cfg_model = songunet_for_authors(sd)
        load_strict(model, sd, f"py-meanflow's SongUNet ({key})")
        nets[role] = model
    if added:
        info["added"] = added
    step, how = torch_step(state, obj.get("epoch"), obj.get("args"))
    info.update(file=args.checkpoint, weights={"ema": weights}, step=step, step_from=how)
    return nets, shape, 0, cfg_model, None


# py-meanflow's training sets (torchvision CIFAR10 and MNIST, train split)
_TRAIN_SIZES = {"cifar10": 50_000, "mnist": 60_000}


def torch_step(state: dict, epoch: Any, run_args: Any) -> tuple[int, str]:
    """The optimizer step a py-meanflow checkpoint was taken at, and how it was found.

    py-meanflow saves after the epoch ``epoch`` (from 0) has finished (``train.py``), and its
    ``MeanFlow.update_ema`` adds 1 to the buffer ``num_updates`` after every optimizer step, so
    that buffer is the count. Without it, the count is ``(epoch + 1) * steps_per_epoch`` with
    ``steps_per_epoch = len(DataLoader) = ceil(N / W) // B`` (DistributedSampler pads each of the
    W ranks to ceil(N / W) rows, the loader drops the last partial batch of B; no gradient
    accumulation), when ``args`` says the dataset, ``batch_size`` and ``world_size``. Otherwise
    the step is unknown: 0, with a one-line reason.
    """
    count = state.get("num_updates")
    if isinstance(count, torch.Tensor) and count.numel() == 1:
        return int(count.item()), "num_updates (optimizer steps taken)"
    get = (lambda k: getattr(run_args, k, None)) if run_args is not None else (lambda k: None)
    size = _TRAIN_SIZES.get(str(get("dataset")))
    batch, world = get("batch_size"), get("world_size")
    if (
        isinstance(epoch, int)
        and size
        and isinstance(batch, int)
        and isinstance(world, int)
        and batch > 0
        and world > 0
        and not get("test_run")
    ):
        per_epoch = -(-size // world) // batch
        return (epoch + 1) * per_epoch, (
            f"(epoch {epoch} + 1) x {per_epoch} steps per epoch "
            f"({get('dataset')}: ceil({size} / {world} GPUs) // batch {batch})"
        )
    return 0, (
        "unknown: the checkpoint has no num_updates and its args do not give the steps per "
        "epoch (dataset, batch_size, world_size); the run starts at step 0"
    )


@dataclass
class ConvertRequest:
    """What to convert (``meanflow convert``'s options): ``source`` ``authors-jax`` or
    ``authors-torch``, the ``checkpoint`` file, ``out`` (a run directory, or a
    ``.safetensors`` file of the EMA weights alone), the network ``arch`` (default from the
    source), which ``weights`` become the EMA, the latent ``image_size`` and ``vae`` folder of a
    DiT, and whether to ``overwrite`` ``out``."""

    source: str
    checkpoint: str
    out: str
    arch: str | None = None
    weights: str | None = None
    image_size: int = 32
    vae: str = ""
    overwrite: bool = False


def convert(args: ConvertRequest) -> dict:
    """Run the conversion ``args``; returns the summary ``meanflow convert`` prints."""
    from safetensors.torch import save_file

    arch = args.arch or ("dit" if args.source == "authors-jax" else "songunet")
    arch = "songunet" if arch == "unet" else arch
    check(
        (arch == "dit") == (args.source == "authors-jax"),
        f"--arch {arch} does not fit "
        f"--from {args.source}: the authors' JAX code has a DiT, py-meanflow a SongUNet",
    )
    to_file = args.out.endswith(".safetensors")
    if os.path.exists(args.out):
        check(
            args.overwrite,
            f"{args.out!r} already exists; pass --overwrite to replace it or choose another name",
        )
        check(
            to_file or os.path.isdir(args.out),
            f"--out {args.out!r} is a file; give a directory (or a name ending in .safetensors)",
        )
    info: dict = {"from": args.source, "checkpoint": os.path.abspath(args.checkpoint)}
    build = _jax_model if args.source == "authors-jax" else _torch_model
    nets, shape, num_classes, model_cfg, latents = build(args, info)
    ema = {k: v.detach().contiguous() for k, v in nets["ema"].state_dict().items()}
    if to_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_file(
            ema,
            args.out,
            metadata={
                "meanflow_convert": json.dumps(
                    {**info, "shape": list(shape), "model": model_cfg, "num_classes": num_classes}
                )
            },
        )
        return {"out": args.out, "tensors": len(ema), **_summary(info)}
    cfg = TrainConfig()
    cfg.data, cfg.preset, cfg.normalize = f"converted:{args.source}", "converted", False
    cfg.data_shape, cfg.num_classes = "x".join(map(str, shape)), num_classes
    for key, value in model_cfg.items():
        setattr(cfg.model, key, value)
    if os.path.isdir(args.out):
        for old in glob.glob(os.path.join(args.out, "checkpoints", "step-*")):
            os.remove(old)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    tensors = {
        **{f"model.{k}": v for k, v in nets["model"].state_dict().items()},
        **{f"ema.{k}": v for k, v in ema.items()},
        **Normalizer.identity(tuple(shape)).tensors(),
    }
    meta = {
        "config": cfg.to_dict(),
        "shape": list(shape),
        "class_names": None,
        "converted_from": info,
        **({"latents": latents} if latents else {}),
    }
    stem = save_checkpoint(os.path.join(args.out, "checkpoints"), info["step"], tensors, meta)
    return {"out": args.out, "checkpoint": stem + ".safetensors", **_summary(info)}


def _summary(info: dict) -> dict:
    spec = info.get("spec", {})
    return {
        "from": info["from"],
        "step": info["step"],
        **({"step_from": info["step_from"]} if "step_from" in info else {}),
        "weights": info["weights"],
        **({"model": spec} if spec else {}),
    }
