"""Inception-v3 features for FID (Heusel et al. 2017), through torch-fidelity.

FID is the Frechet distance (:mod:`.frechet`) between Gaussians fitted to the 2048 pool features
of Inception-v3. We take the network from **torch-fidelity** (optional extra ``meanflow[fid]``)
because its ``FeatureExtractorInceptionV3`` is a port of the TensorFlow graph of the original FID
code, including TensorFlow's bilinear resize to 299 x 299, so its values agree with the
TF-based evaluators that papers report (such as ADM's suite); it takes
a local weights file, and torchmetrics' FID is built on the same class. clean-fid resizes
differently (by design), and pytorch-fid needs torchvision's Inception.

Images enter as the data loaders give them, (N, C, H, W) in [-1, 1]; they are quantised like the
uint8 export of ``meanflow sample --out FILE.npz``, ``round((x + 1) * 127.5)`` clipped, grey
images repeated to three channels.

Weights are never downloaded. They are looked for in this order: ``--inception-weights FILE``,
the environment variable ``MEANFLOW_INCEPTION_WEIGHTS``, and torch-fidelity's own cache
(``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where it would
download them). The file is first read with ``torch.load(weights_only=True)``, which refuses
anything but tensors, before torch-fidelity loads it.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from ..errors import MeanFlowError, check

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
WEIGHTS_ENV = "MEANFLOW_INCEPTION_WEIGHTS"
FEATURE_LAYER = "2048"


def library_cache_path() -> str:
    """Where torch-fidelity keeps (and would download) the weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def find_weights(path: str | None = None) -> str:
    """The Inception weights file to use (see the module docstring for the search order)."""
    if path:
        check(
            os.path.isfile(path),
            f"--inception-weights {path!r} does not exist; download "
            f"{WEIGHTS_URL} on a machine with internet access and pass its path",
        )
        return path
    env = os.environ.get(WEIGHTS_ENV, "")
    if env:
        check(
            os.path.isfile(env),
            f"{WEIGHTS_ENV}={env!r} does not exist; point it at the "
            f"file downloaded from {WEIGHTS_URL}",
        )
        return env
    cached = library_cache_path()
    check(
        os.path.isfile(cached),
        f"FID needs the Inception-v3 weights, which are never "
        f"downloaded at run time and are not in {cached}; download {WEIGHTS_URL} on a "
        f"machine with internet access, then pass --inception-weights FILE, set {WEIGHTS_ENV}"
        f", or copy it to that path",
    )
    return cached


def file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _check_state_dict(path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise MeanFlowError(
            f"{path}: not a weights file of plain tensors ({exc.__class__.__name__}"
            f": {(str(exc).splitlines() or [''])[0][:200]})"
        ) from None
    check(
        isinstance(state, dict)
        and state
        and all(isinstance(v, torch.Tensor) for v in state.values()),
        f"{path}: expected a state dict of tensors (torch-fidelity's {WEIGHTS_NAME})",
    )


def _library_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise MeanFlowError(
            "FID needs torch-fidelity: pip install 'meanflow[fid]' (it imports torchvision, "
            f"which must be built for your torch {torch.__version__}); importing it failed with "
            f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        ) from None
    return FeatureExtractorInceptionV3


class InceptionFeatures(nn.Module):
    """Any torch-fidelity-style extractor (uint8 (B, 3, H, W) -> tuple of features) as a feature
    network of :func:`.features.extract`: images in [-1, 1], one or three channels."""

    channels = (1, 3)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.net(pixels)[0].float()


def load_inception(path: str | None = None) -> tuple[InceptionFeatures, dict]:
    """torch-fidelity's Inception-v3 (pool features, 2048) from local weights, and its meta
    (name, weights path, fingerprint of the file, library version)."""
    path = find_weights(path)
    _check_state_dict(path)
    cls = _library_class()
    try:
        net = cls("inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=path)
    except Exception as exc:
        raise MeanFlowError(
            f"{path}: torch-fidelity cannot load these Inception weights "
            f"({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            ")"
        ) from None
    import importlib.metadata as md

    try:
        version = md.version("torch-fidelity")
    except md.PackageNotFoundError:
        version = "unknown"
    meta = {
        "name": "inception-v3",
        "weights": os.path.abspath(path),
        "fingerprint": file_fingerprint(path),
        "library": f"torch-fidelity {version}",
        "feature_dim": 2048,
    }
    return InceptionFeatures(net.eval().requires_grad_(False)), meta
