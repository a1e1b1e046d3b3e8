"""What the loop draws from: the training set opened from the config, shuffled batches whose
position is all a checkpoint needs."""

from __future__ import annotations

import os

import torch

from ..config.schema import TrainConfig, format_shape
from ..data import TrainingSet, open_data
from ..data.image_stream import is_image_folder, open_image_stream
from ..data.latents import LatentShards, is_latents_dir
from ..data.stream import permutation


class Batches:
    """Shuffled mini-batches without replacement; one permutation per epoch, seeded by
    ``(seed, epoch)`` so the position ``(epoch, index)`` is all a checkpoint needs. ``part``
    (a slice) keeps only this process's rows of each batch (data-parallel training)."""

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        seed: int,
        labels: torch.Tensor | None = None,
        part: slice = slice(None),
    ) -> None:
        self.data, self.labels, self.batch_size, self.seed = data, labels, batch_size, seed
        self.part = part
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return permutation(self.data.shape[0], self.seed, self.epoch).to(self.data.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next ``(x, y)`` (this process's rows); ``y`` is None for unlabelled data."""
        if self.index + self.batch_size > self.data.shape[0]:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index : self.index + self.batch_size][self.part]
        self.index += self.batch_size
        return self.data[idx], None if self.labels is None else self.labels[idx]

    def close(self) -> None:
        """Nothing to release (streamed batches stop their workers here)."""

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation()


def open_training_data(cfg: TrainConfig) -> TrainingSet:
    """Open ``cfg.data`` and record its shape and classes in ``cfg`` (labels are dropped when
    ``cfg.conditional`` is false). A latents directory (``meanflow latents encode``) is opened
    for streaming: its shards stay on disk; so is an image folder when ``cfg.stream``."""
    if is_latents_dir(cfg.data):
        data = open_latents(cfg.data)
    elif cfg.stream and is_image_folder(cfg.data):
        data = open_image_stream(cfg.data, cfg.image_size, labelled=cfg.conditional)
    else:
        data = open_data(
            cfg.data, directory=cfg.data_dir, size=cfg.image_size, num=cfg.num_data, seed=cfg.seed
        )
    record_data(cfg, data)
    return data


def open_latents(path: str) -> TrainingSet:
    """A latents directory as a streamed :class:`TrainingSet` of posterior moments."""
    shards = LatentShards(path)
    labels = shards.labels
    return TrainingSet(
        None,
        None if labels is None else torch.from_numpy(labels),
        shards.class_names if labels is not None else None,
        "latents",
        os.path.abspath(path),
        reader=shards,
        sample_shape=tuple(shards.shape),
        latents={
            "scaling_factor": shards.scaling_factor,
            "shift_factor": shards.shift_factor,
            "vae": shards.vae,
            "flips": shards.flips,
            "image_size": shards.image_size,
            "source": shards.meta.get("source"),
        },
    )


def record_data(cfg: TrainConfig, data: TrainingSet) -> None:
    """Write an opened data set's shape and classes into ``cfg`` (dropping the labels first
    when ``cfg.conditional`` is false)."""
    if not cfg.conditional:
        data.labels, data.class_names = None, None
    cfg.data_shape, cfg.num_classes = format_shape(data.shape), data.num_classes
