"""Domain feature networks for Frechet distance on small grey images ("FD-FMNIST", "FD-digits").

Inception-v3 features mean little on 28 x 28 grey images, so we train a small classifier on the
dataset itself and measure distances in its penultimate layer (128 features), as FID does with
Inception's pool layer. The network (:class:`FeatureNet`):

    [Conv3x3 -> GroupNorm -> SiLU] x 2 at full size, avg-pool 2, [.. ] x 2 at half size, avg-pool 2,
    Conv3x3 -> GroupNorm -> SiLU, global average pool -> Linear(128) -> SiLU  (features)
    -> Linear(num_classes)  (logits)

It is trained by ``meanflow features train`` (:func:`train_feature_net`: Adam, cross-entropy,
random shifts of up to 2 pixels, fixed seed) and saved as safetensors plus a JSON sidecar with
the data shape, classes, test accuracy and a fingerprint of the weights (used to key cached
reference statistics). Images enter in [-1, 1], as the data loaders give them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..errors import MeanFlowError, check

FEATURE_DIM = 128
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


class FeatureExtractor(Protocol):
    """What :func:`extract` needs of a feature network (a :class:`FeatureNet`, an
    :class:`.inception.InceptionFeatures`): the image channels it takes, features of a batch of
    images in [-1, 1], and its parameters (for its device)."""

    @property
    def channels(self) -> tuple[int, ...]: ...

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = ...) -> Iterator[nn.Parameter]: ...


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class FeatureNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.body = nn.Sequential(
            _block(in_channels, width),
            _block(width, width),
            nn.AvgPool2d(2),
            _block(width, 2 * width),
            _block(2 * width, 2 * width),
            nn.AvgPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @property
    def channels(self) -> tuple[int, ...]:
        """Image channels the network takes."""
        return (self.in_channels,)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, 128) of images (B, C, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (padding with the background -1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]  # (b, 1, w)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # (b, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(
    model: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000
) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def train_feature_net(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[FeatureNet, float]:
    """Train a :class:`FeatureNet`; returns it (in eval mode) and its test accuracy."""
    check(epochs >= 1 and batch_size >= 1, "epochs and batch size must be >= 1")
    check(
        len(train_x) >= 2 and len(test_x) >= 1,
        f"a feature network needs at least 2 "
        f"training and 1 test images, got {len(train_x)} and {len(test_x)}",
    )
    batch_size = min(batch_size, len(train_x))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FeatureNet(train_x.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, disable=not progress, unit="step", desc="feature net")
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_shift(train_x[idx], gen)), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval(), accuracy(model, test_x, test_y)


def fingerprint(model: FeatureNet) -> str:
    """A short hash of the weights: equal weights, equal fingerprint."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_feature_net(model: FeatureNet, path: str, info: dict) -> dict:
    """Write ``path`` (.safetensors) and ``path`` with .json: shape, classes, accuracy, hash."""
    check(path.endswith(".safetensors"), f"feature net file must end in .safetensors, got {path!r}")
    meta = {
        **info,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "width": model.width,
        "feature_dim": FEATURE_DIM,
        "fingerprint": fingerprint(model),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(path[: -len(".safetensors")] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def shipped_feature_nets() -> list[str]:
    """Names of the feature networks shipped with the package (``digits``, ``fashion-mnist``)."""
    if not os.path.isdir(WEIGHTS_DIR):
        return []
    return sorted(
        n[: -len(".safetensors")] for n in os.listdir(WEIGHTS_DIR) if n.endswith(".safetensors")
    )


def load_feature_net(name_or_path: str) -> tuple[FeatureNet, dict]:
    """A feature net shipped with the package (``fashion-mnist``, ``digits``) or a
    ``.safetensors`` file written by ``meanflow features train``."""
    path = name_or_path
    if not path.endswith(".safetensors"):
        path = os.path.join(WEIGHTS_DIR, f"{name_or_path}.safetensors")
        shipped = shipped_feature_nets()
        check(
            os.path.isfile(path),
            f"no feature network {name_or_path!r}; shipped: "
            f"{', '.join(shipped) or 'none'}; or train one with `meanflow features train "
            "--data NAME --out FILE.safetensors` and pass its path",
        )
    check(os.path.isfile(path), f"feature network file {path!r} does not exist")
    try:
        with open(path[: -len(".safetensors")] + ".json") as f:
            meta = json.load(f)
        tensors = load_file(path)
        model = FeatureNet(meta["in_channels"], meta["num_classes"], meta["width"])
        model.load_state_dict(tensors)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise MeanFlowError(
            f"{path}: cannot load the feature network ({exc.__class__.__name__}"
            f": {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return model.eval().requires_grad_(False), meta


@torch.no_grad()
def extract(
    model: FeatureExtractor,
    images: torch.Tensor,
    batch: int = 500,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """Features (N, D) on the CPU of images (N, C, H, W) in [-1, 1], in batches on the model's
    device; ``model`` is a :class:`FeatureNet` or any module with ``features`` and ``channels``
    (e.g. :class:`.inception.InceptionFeatures`); ``progress``: a bar named ``desc`` on stderr."""
    check(
        images.dim() == 4 and images.shape[1] in model.channels,
        f"the feature network takes images of {' or '.join(map(str, model.channels))} "
        f"channels, got shape {tuple(images.shape[1:])}",
    )
    device = next(model.parameters()).device
    out = []
    with tqdm(
        total=len(images), disable=not progress, unit="image", desc=desc, dynamic_ncols=True
    ) as bar:
        for i in range(0, len(images), batch):
            out.append(model.features(images[i : i + batch].to(device).float()).cpu())
            bar.update(len(out[-1]))
    return torch.cat(out)
