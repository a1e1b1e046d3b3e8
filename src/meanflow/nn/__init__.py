"""Networks obeying ``model(z, r, t, y=None) -> u`` (MLP, ADM U-Net, SongUNet, DiT), their
forward-mode layers and attention, and the converters of the authors' weight layouts.

Layer: imports ``meanflow.errors`` only; no network imports an objective.
"""

from .dit import DIT_CONFIGS, DiT, dit
from .embeddings import TIME_INPUTS, TimeEmbedding
from .mlp import MLP
from .songunet import SONGUNET_CONFIGS, SongUNet, songunet
from .unet import UNET_CONFIGS, UNet, unet

__all__ = [
    "MLP",
    "DiT",
    "dit",
    "DIT_CONFIGS",
    "TimeEmbedding",
    "TIME_INPUTS",
    "UNet",
    "unet",
    "UNET_CONFIGS",
    "SongUNet",
    "songunet",
    "SONGUNET_CONFIGS",
]
