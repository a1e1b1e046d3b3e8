"""The image <-> latent side of latent MeanFlow: a diffusers ``AutoencoderKL`` (e.g. the SD-VAE)
loaded from a local folder, ADM's centre crop, and encoding/decoding in our conventions.

Images are (B, 3, H, W) float32 in [-1, 1]. The VAE's posterior is a diagonal Gaussian
N(mean, std^2) per image; training draws ``z = (mean + std * eps - shift) * scaling_factor``
afresh every step (see :func:`meanflow.data.latents.draw_latents`), so :func:`decode` takes
``z`` in that training scale and hands the VAE ``z / scaling_factor + shift``.

Nothing here downloads: a VAE is read with ``local_files_only=True`` from a folder the user
fetched beforehand, and only from safetensors weights (loading weights never unpickles).
diffusers is optional (``pip install 'meanflow[latents]'``).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import torch

from ..errors import MeanFlowError, check
from .latents import read_json

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL
    from PIL import Image as PILImage

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_FETCH_HINT = (
    "download one beforehand, e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema "
    "--local-dir vae/sd-vae-ft-ema`, and pass that folder"
)


def find_vae_dir(path: str) -> str:
    """The absolute folder holding the VAE's ``config.json``: ``path`` itself, or its ``vae/``
    sub-folder when ``path`` is a whole diffusers pipeline (``model_index.json``)."""
    check(isinstance(path, str) and path != "", f"no VAE folder given; {_FETCH_HINT}")
    check(os.path.isdir(path), f"VAE folder {path!r} does not exist; {_FETCH_HINT}")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "vae", "config.json")
    ):
        path = os.path.join(path, "vae")
    config_path = os.path.join(path, "config.json")
    check(
        os.path.isfile(config_path),
        f"{path!r} is not a diffusers VAE folder (it holds no config.json); {_FETCH_HINT}",
    )
    config = read_json(config_path, "the VAE config", "download the VAE again")
    kind = config.get("_class_name") if isinstance(config, dict) else None
    check(
        kind == "AutoencoderKL",
        f"{config_path} describes a {kind or 'non-diffusers'} model, "
        f"not an AutoencoderKL; pass the folder of a diffusers VAE such as "
        "stabilityai/sd-vae-ft-ema",
    )
    check(
        os.path.isfile(os.path.join(path, WEIGHTS_NAME)),
        f"{path!r} holds no {WEIGHTS_NAME}; "
        "pickled .bin weights are refused because unpickling can execute code, download the "
        "safetensors weights",
    )
    return os.path.abspath(path)


def load_vae(path: str, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load the diffusers ``AutoencoderKL`` in folder ``path`` (``local_files_only``, never a
    download) onto ``device``, in eval mode with gradients off, float32."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MeanFlowError(
            "VAE latents need diffusers; run `pip install 'meanflow[latents]'`"
        ) from None
    folder = find_vae_dir(path)
    try:
        # low_cpu_mem_usage would need accelerate (and warn without it); the VAE is small
        vae = AutoencoderKL.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            torch_dtype=torch.float32,
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise MeanFlowError(f"cannot load the VAE in {folder!r}: {first[:200]}") from None
    vae = vae.to(torch.device(device)).eval()
    vae.requires_grad_(False)
    return vae


def vae_downsampling(vae: AutoencoderKL) -> int:
    """How many image pixels one latent pixel spans per side: 2^(encoder blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_factors(vae: AutoencoderKL) -> tuple[float, float | None]:
    """``(scaling_factor, shift_factor)`` from the VAE's config (shift None when absent)."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), None if shift is None else float(shift)


def adm_center_crop(image: PILImage.Image, size: int) -> PILImage.Image:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``), as RGB ``size`` x ``size``.

    While the shorter side is at least ``2 * size`` the image is halved (integer halves, BOX
    filter); then it is scaled (BICUBIC) so its shorter side is ``size`` (the other side
    rounded), and the centre ``size`` x ``size`` is cut out (offsets ``(side - size) // 2``).
    """
    from PIL import Image

    check(isinstance(size, int) and size > 0, f"crop size must be a positive integer, got {size!r}")
    resampling = getattr(Image, "Resampling", Image)
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), resample=resampling.BICUBIC
    )
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _vae_param(vae) -> torch.Tensor:
    return next(vae.parameters())


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(mean, std^2) of ``images`` (B, 3, H, W) in [-1, 1]: ``(mean, std)``,
    each float32 (B, C, H/d, W/d) on the VAE's device (std = exp(logvar / 2), logvar clamped
    to [-30, 20] by diffusers)."""
    check(
        images.ndim == 4 and images.shape[1] == 3,
        f"encode takes (B, 3, H, W) images, got shape {tuple(images.shape)}",
    )
    param = _vae_param(vae)
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def decode(
    vae: AutoencoderKL, z: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """Images (B, 3, H, W) float32 in [-1, 1] (clamped) from latents ``z`` in training scale:
    the VAE decodes ``z / scaling_factor + shift_factor`` (shift 0 when None)."""
    check(z.ndim == 4, f"decode takes (B, C, H, W) latents, got shape {tuple(z.shape)}")
    param = _vae_param(vae)
    latents = z.to(param.device, torch.float32) / scaling_factor + (shift_factor or 0.0)
    images = vae.decode(latents.to(param.dtype)).sample
    return images.float().clamp(-1.0, 1.0)


def latent_decoder(
    latents: dict,
    device: str | torch.device = "cpu",
    vae_path: str | None = None,
    required: bool = True,
):
    """For a latent run's facts (``vae``, ``scaling_factor``, ``shift_factor``: the checkpoint's
    ``latents`` entry), a function mapping latents in training scale to images in [-1, 1].
    ``vae_path`` overrides the recorded VAE directory. When the VAE cannot be loaded and
    ``required`` is false, returns None after one line on stderr."""
    path = vae_path or latents.get("vae") or ""
    try:
        vae = load_vae(path, device)
    except MeanFlowError as exc:
        if required:
            raise
        print(f"meanflow: note: latents are not decoded to images ({exc})", file=sys.stderr)
        return None
    return LatentDecoder(vae, float(latents["scaling_factor"]), latents.get("shift_factor"))


class LatentDecoder:
    """Latents in training scale -> images in [-1, 1] with ``vae`` (:func:`decode`); the VAE
    module stays reachable as ``.vae`` (the diffusers pipeline registers it)."""

    def __init__(self, vae: AutoencoderKL, scaling_factor: float, shift: float | None) -> None:
        self.vae, self.scaling_factor, self.shift_factor = vae, scaling_factor, shift

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, z, self.scaling_factor, self.shift_factor)


__all__ = [
    "load_vae",
    "latent_decoder",
    "LatentDecoder",
    "find_vae_dir",
    "adm_center_crop",
    "encode",
    "decode",
    "vae_downsampling",
    "vae_factors",
]
