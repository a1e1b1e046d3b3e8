"""Parameter-name mappings from the MeanFlow authors' released code onto our networks.

Two sources (see docs/convert.md for the file formats and what is not supported):

* **authors-jax** (github.com/Gsunshine/meanflow, ``models/models_dit.py``): flax parameters of
  their ``DiT`` under ``params['net']``, as a nested dict of numpy arrays, e.g.
  ``blocks/layers_3/attn/qkv/_flax_linear/kernel``. Dense kernels are (in, out) and become
  Linear weights (out, in); the patchify ``nn.Conv`` kernel is HWIO and becomes OIHW; the
  LayerNorms have no parameters (``elementwise_affine=False``), the positional embedding is not
  a parameter (ours, :func:`~meanflow.nn.dit.sincos_2d`, is the same fixed table). Their network
  reads NHWC images and ours NCHW; the token order (row-major patches) and the final Linear's
  output order (patch row, patch column, channel) are the same, so no other permutation is
  needed.
* **authors-torch** (github.com/Gsunshine/py-meanflow, ``meanflow/models/unet.py``): EDM's
  ``SongUNet`` state dict under the prefixes ``net.`` (raw), ``net_ema.``, ``net_ema1.``, ...
  of their ``MeanFlow`` module, mapped by name onto our SongUNet.

Every mapping refuses unknown and missing names with one line that lists them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MeanFlowError, check
from .dit import DIT_CONFIGS

# their flax path (under params['net'], '/'-joined) -> (our key, transform)
_DIT_RULES = [
    (r"x_embedder/proj/kernel", "patchify.weight", "hwio"),
    (r"x_embedder/proj/bias", "patchify.bias", ""),
    (
        r"(t|h)_embedder/mlp/layers_(0|2)/_flax_linear/kernel",
        r"cond.\1_embedder.mlp.\2.weight",
        "dense",
    ),
    (r"(t|h)_embedder/mlp/layers_(0|2)/_flax_linear/bias", r"cond.\1_embedder.mlp.\2.bias", ""),
    (r"y_embedder/embedding_table/_flax_embedding/embedding", "cond.label.weight", ""),
    (
        r"blocks/layers_(\d+)/attn/(qkv|proj)/_flax_linear/kernel",
        r"blocks.\1.attn.\2.weight",
        "dense",
    ),
    (r"blocks/layers_(\d+)/attn/(qkv|proj)/_flax_linear/bias", r"blocks.\1.attn.\2.bias", ""),
    (r"blocks/layers_(\d+)/mlp/fc1/_flax_linear/kernel", r"blocks.\1.mlp.0.weight", "dense"),
    (r"blocks/layers_(\d+)/mlp/fc1/_flax_linear/bias", r"blocks.\1.mlp.0.bias", ""),
    (r"blocks/layers_(\d+)/mlp/fc2/_flax_linear/kernel", r"blocks.\1.mlp.2.weight", "dense"),
    (r"blocks/layers_(\d+)/mlp/fc2/_flax_linear/bias", r"blocks.\1.mlp.2.bias", ""),
    (
        r"blocks/layers_(\d+)/adaLN_modulation/layers_1/_flax_linear/kernel",
        r"blocks.\1.ada.1.weight",
        "dense",
    ),
    (
        r"blocks/layers_(\d+)/adaLN_modulation/layers_1/_flax_linear/bias",
        r"blocks.\1.ada.1.bias",
        "",
    ),
    (r"final_layer/adaLN_modulation/layers_1/_flax_linear/kernel", "final.ada.1.weight", "dense"),
    (r"final_layer/adaLN_modulation/layers_1/_flax_linear/bias", "final.ada.1.bias", ""),
    (r"final_layer/linear/_flax_linear/kernel", "final.linear.weight", "dense"),
    (r"final_layer/linear/_flax_linear/bias", "final.linear.bias", ""),
]


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict flattened to ``{'a/b/c': leaf}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _array(value: Any, name: str) -> np.ndarray:
    check(
        isinstance(value, np.ndarray),
        f"{name} is not an array (got {type(value).__name__}); "
        "is this a flax checkpoint of the authors' DiT?",
    )
    return value


def dit_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """The DiT size, patch, channels, classes and depth of the authors' flax DiT ``params``
    (the tree under ``params['net']``), read from the parameter shapes. The head count is not
    stored in the weights; it is the one of the size whose (depth, hidden) match."""
    flat = flatten_tree(params)
    check(
        "x_embedder/proj/kernel" in flat,
        "no x_embedder/proj/kernel in the parameters; is "
        "this the authors' DiT (models/models_dit.py)?",
    )
    kernel = _array(flat["x_embedder/proj/kernel"], "x_embedder/proj/kernel")
    check(
        kernel.ndim == 4 and kernel.shape[0] == kernel.shape[1],
        f"x_embedder/proj/kernel has shape {kernel.shape}, expected (p, p, C, hidden)",
    )
    patch, _, channels, hidden = kernel.shape
    depth = len({m.group(1) for k in flat for m in [re.match(r"blocks/layers_(\d+)/", k)] if m})
    sizes = [s for s, c in DIT_CONFIGS.items() if (c["depth"], c["hidden"]) == (depth, hidden)]
    check(
        len(sizes) == 1,
        f"no DiT size has depth {depth} and hidden {hidden} (sizes: "
        + ", ".join(f"{s}={c['depth']}x{c['hidden']}" for s, c in DIT_CONFIGS.items())
        + ")",
    )
    table = flat.get("y_embedder/embedding_table/_flax_embedding/embedding")
    check(table is not None, "no y_embedder/embedding_table in the parameters")
    assert table is not None  # check() raised otherwise
    fc1 = flat.get("blocks/layers_0/mlp/fc1/_flax_linear/kernel")
    check(
        fc1 is not None and fc1.shape == (hidden, 4 * hidden),
        "the MLP width is not 4 x "
        f"hidden (fc1 kernel {None if fc1 is None else fc1.shape}); only mlp_ratio 4 converts",
    )
    out = flat.get("final_layer/linear/_flax_linear/kernel")
    check(
        out is not None and out.shape == (hidden, patch * patch * channels),
        f"final_layer/linear kernel {None if out is None else out.shape} is not (hidden, "
        f"p*p*C) = ({hidden}, {patch * patch * channels}); learn_sigma=True is not supported",
    )
    return {
        "size": f"{sizes[0]}/{patch}",
        "patch": int(patch),
        "in_channels": int(channels),
        "hidden": int(hidden),
        "depth": depth,
        "num_classes": int(table.shape[0]) - 1,
    }


def dit_state_dict(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our DiT's state dict (float32 tensors) from the authors' flax DiT ``params``. Unknown
    parameter names raise :class:`MeanFlowError` listing them."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in flatten_tree(params).items():
        for pattern, target, how in _DIT_RULES:
            m = re.fullmatch(pattern, name)
            if m is None:
                continue
            array = np.asarray(_array(value, name), dtype=np.float32)
            if how == "dense":
                check(array.ndim == 2, f"{name} has shape {array.shape}, expected (in, out)")
                array = array.T
            elif how == "hwio":
                array = array.transpose(3, 2, 0, 1)
            out[m.expand(target)] = torch.from_numpy(np.array(array, order="C"))  # a copy
            break
        else:
            unknown.append(name)
    if unknown:
        raise MeanFlowError(
            f"unknown parameter names in the authors' DiT checkpoint (not "
            f"converted): {_listing(unknown)}"
        )
    return out


def unet_state_dict(
    state: Mapping[str, torch.Tensor], prefix: str = "net_ema1."
) -> dict[str, torch.Tensor]:
    """The SongUNet weights under ``prefix`` of a py-meanflow ``MeanFlow`` state dict (their
    names are EDM's: ``map_layer0.weight``, ``enc.32x32_conv.weight``, ``dec.32x32_block3...``),
    with the prefix removed and as float32; our SongUNet uses the same names."""
    out = {
        k[len(prefix) :]: v.float()
        for k, v in state.items()
        if k.startswith(prefix) and isinstance(v, torch.Tensor)
    }
    check(
        out,
        f"no tensors under {prefix!r} in the checkpoint; prefixes found: "
        f"{_listing({k.split('.', 1)[0] + '.' for k in state})}",
    )
    return out


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` or raise one line naming the unknown, missing and
    mis-shaped tensors (so a conversion never leaves a weight at its initial value)."""
    own = model.state_dict()
    unknown = set(state) - set(own)
    missing = set(own) - set(state)
    shapes = [
        f"{k} {tuple(state[k].shape)} vs ours {tuple(own[k].shape)}"
        for k in sorted(set(state) & set(own))
        if state[k].shape != own[k].shape
    ]
    problems = []
    if unknown:
        problems.append(f"unknown: {_listing(unknown)}")
    if missing:
        problems.append(f"missing: {_listing(missing)}")
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    if problems:
        raise MeanFlowError(f"{source} does not match our network; " + "; ".join(problems))
    model.load_state_dict(state)


__all__ = ["flatten_tree", "dit_spec", "dit_state_dict", "unet_state_dict", "load_strict"]
