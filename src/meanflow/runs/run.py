"""Reading a run directory back: normalization, the trained network, samples in data units,
and the pictures a run writes (scatter plot or image grid, loss curve)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import nn

from ..config.build import build_model
from ..config.overrides import _suggest
from ..config.schema import TrainConfig
from ..data.vae import latent_decoder
from ..errors import MeanFlowError, check
from ..flow.sampling import sample
from ..objectives.guidance import sampling_guidance
from ..objectives.imf import with_guidance
from ..runtime.devices import resolve_device
from .noise import iter_noise

# What ``classes=`` takes (see TrainedRun.sample and parse_classes).
Classes = Union[str, int, Sequence[str | int], None]  # noqa: UP007 - a runtime alias (3.10)


def grid_labels(num: int, num_classes: int) -> torch.Tensor | None:
    """Labels ``i mod K``: in a grid of K columns, one column per class."""
    return None if num_classes == 0 else torch.arange(num) % num_classes


def grid_columns(num: int, num_classes: int) -> int:
    if 0 < num_classes <= 32:
        return num_classes
    return max(1, math.isqrt(num))


@dataclass
class Normalizer:
    """Standardization ``(x - mean) / std`` per dimension of vectors (mean of shape (D,)) or per
    channel of (C, H, W) arrays (shape (C, 1, 1)); identity for images already in [-1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Normalizer:
        x = x.double()
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        keep = x.dim() != 2
        if x.shape[0] * (1 if x.dim() == 2 else x.shape[2] * x.shape[3]) < 2:
            return cls.identity(tuple(x.shape[1:]))
        std = x.std(dim=dims, keepdim=keep).clamp_min(1e-8)
        mean = x.mean(dim=dims, keepdim=keep)
        if keep:
            mean, std = mean[0], std[0]
        return cls(mean.float(), std.float())

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Normalizer:
        stat = (shape[0],) if len(shape) == 1 else (shape[0], 1, 1)
        return cls(torch.zeros(stat), torch.ones(stat))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data.mean": self.mean, "data.std": self.std}


@dataclass
class TrainedRun:
    """A trained run read back by :func:`load_run`.

    ``model`` is the network (EMA weights unless loaded with ``weights="raw"``), in eval mode on
    the device it was loaded to; ``config`` its :class:`~meanflow.train.TrainConfig`;
    ``normalizer`` maps network space to data units; ``step`` is the checkpoint's step; ``shape``
    one sample's shape, (D,) or (C, H, W). ``class_names`` lists a class-conditional run's classes
    in label order (None when unconditional): :meth:`sample` takes them, or their indices, as
    ``classes=``::

        run = meanflow.load_run("runs/fmnist")
        images = run.sample(64, classes="Sneaker")       # (64, 1, 28, 28), pixel scale [-1, 1]
        grid = run.sample(100, classes=run.class_names)  # one class per column of 10
    """

    model: nn.Module
    config: TrainConfig
    normalizer: Normalizer
    step: int
    weights: str  # "ema" (the primary EMA), "raw" or an extra EMA's name, e.g. "ema-0.99995"
    shape: tuple[int, ...] = ()
    class_names: list[str] | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images [-1, 1]
    latents: dict | None = None  # a latent run's VAE facts (scaling_factor, vae, image_size...)

    def __repr__(self) -> str:
        return (
            f"TrainedRun(step={self.step}, weights={self.weights!r}, shape={self.shape}, "
            f"num_classes={self.num_classes}, objective={self.config.objective!r}, "
            f"device='{self.device}')"
        )

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample :meth:`sample` returns: the decoded image's (3, S, S) for a
        latent run with its VAE, else :attr:`shape`."""
        if self.decoder is not None and self.latents and self.latents.get("image_size"):
            size = int(self.latents["image_size"])
            return (3, size, size)
        return self.shape

    @property
    def device(self) -> torch.device:
        """Where the network lives: the default device of :meth:`sample`."""
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    @property
    def trained_scale(self) -> float:
        """The CFG scale folded into training, ``omega / (1 - kappa)`` (1 when unconditional)."""
        g = self.config.guidance
        return g.omega / (1 - g.kappa) if self.num_classes else 1.0

    def guided_model(self, guidance: float = 1.0, labelled: bool = True):
        """The network to sample with at guidance scale ``guidance``: itself at 1; for a run with
        guidance inputs (improved MeanFlow) itself with the scale as input, over
        ``[guidance.t_min, guidance.t_max]`` (one evaluation); otherwise classifier-free guidance
        at sampling time (:func:`~meanflow.objectives.guidance.sampling_guidance`, two evaluations).
        ``labelled``: whether the samples have class labels (guidance needs them)."""
        g = self.config.guidance
        if getattr(g, "inputs", False):  # improved MeanFlow: the scale is a network input
            check(labelled or guidance == 1, "--guidance needs class labels; not with --class none")
            return with_guidance(self.model, guidance, g.t_min, g.t_max)
        if guidance == 1:
            return self.model
        check(
            self.num_classes > 0,
            "--guidance needs a class-conditional run; this run is unconditional",
        )
        check(labelled, "--guidance needs class labels; not with --class none")
        return sampling_guidance(self.model, guidance, self.num_classes)

    def save_pretrained(self, directory: str, overwrite: bool = False) -> str:
        """Write this network as ``config.json`` + ``model.safetensors``
        (:func:`meanflow.runs.pretrained.save_pretrained`); :func:`meanflow.from_pretrained` reads
        it back."""
        # pretrained.py builds on this module (it assembles TrainedRuns): imported on use
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload this network to the Hugging Face Hub
        (:func:`meanflow.runs.pretrained.push_to_hub`)."""
        from .pretrained import push_to_hub  # on use, as in save_pretrained

        return push_to_hub(self, repo_id, private=private, token=token)

    def sample(
        self,
        num: int,
        steps: int = 1,
        seed: int = 0,
        schedule=None,
        device: torch.device | str | None = None,
        batch: int | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        classes: Classes = None,
        decode: bool = True,
    ) -> np.ndarray:
        """``num`` samples in data units, float32 of shape (num, *shape), from noise seeded by
        ``seed``, in ``steps`` uniform steps or over ``schedule`` (e.g. ``[1.0, 0.5, 0.0]``).

        A class-conditional run is conditioned by ``classes`` (as ``--class``: a class name or
        index, a list of them or a comma-separated string, cycled over the samples; ``"random"``;
        ``None`` or ``"none"``: the null label, i.e. unconditional) or by ``labels``, a (num,)
        tensor of indices (not both). ``guidance`` != 1 adds classifier-free guidance at sampling
        time (:func:`~meanflow.objectives.guidance.sampling_guidance`, two evaluations per
        step); a run trained with guidance inputs (improved MeanFlow, ``guidance.inputs``) takes
        it as its input scale instead, over ``[guidance.t_min, guidance.t_max]``: one evaluation.
        ``device`` defaults to the run's (:attr:`device`); ``batch`` bounds the rows per pass.
        A latent run with its VAE returns decoded images in [-1, 1] (``decode=False``: the
        latents)."""
        chunks = list(
            self.iter_samples(
                num, steps, seed, schedule, device, batch, labels, guidance, classes, decode=decode
            )
        )
        return torch.cat(chunks).numpy().astype(np.float32)

    def iter_samples(
        self,
        num: int,
        steps: int = 1,
        seed: int = 0,
        schedule=None,
        device: torch.device | str | None = None,
        batch: int | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        classes: Classes = None,
        start: int = 0,
        stop: int | None = None,
        decode: bool = True,
    ):
        """The samples of :meth:`sample` (the same ones for the same arguments), as float32 CPU
        tensors of at most ``batch`` rows, so callers can stream them with bounded memory.
        A latent run with a VAE (:attr:`decoder`) yields decoded images in [-1, 1] unless
        ``decode`` is false (then the latents, in training scale).

        Only rows ``[start, stop)`` of the ``num`` samples are made (``stop`` None: ``num``):
        row i's noise depends on ``seed`` and i alone (:func:`~meanflow.runs.noise.sample_noise`),
        and its label is row i of the labels built for all ``num`` rows, so disjoint ranges
        computed apart (one per rank under torchrun) join into the samples of one call.
        Batches end at multiples of ``batch`` counted from row 0, so ranges that start at such
        a multiple pass the network the very batches one call does and join bit for bit (other
        splits may differ in the last bit: a network's rounding can depend on the batch
        size)."""
        check(num >= 1, f"--num must be >= 1, got {num}")
        stop = num if stop is None else stop
        check(
            0 <= start <= stop <= num,
            f"need 0 <= start <= stop <= num ({num}), got start={start}, stop={stop}",
        )
        if classes is not None:
            check(labels is None, "give classes= or labels=, not both")
            labels = parse_classes(classes, num, self, seed, option="classes")
        if labels is not None:
            labels = torch.as_tensor(labels)
            check(self.num_classes > 0, "this run is unconditional; drop --class")
            check(tuple(labels.shape) == (num,), f"need {num} labels, got {tuple(labels.shape)}")
            check(
                not labels.is_floating_point()
                and bool(((labels >= 0) & (labels <= self.num_classes)).all()),
                f"labels must be integers in "
                f"0..{self.num_classes - 1} (or {self.num_classes}, the null label)",
            )
        device = self.device if device is None else device
        model = self.guided_model(guidance, labelled=labels is not None)
        batch = batch or (65536 if len(self.shape) == 1 else 256)
        i = start
        for noise in iter_noise(self.shape, seed, start, stop, batch):
            n = len(noise)
            y = None if labels is None else labels[i : i + n].to(device)
            z = sample(model, noise.to(device), steps=steps, schedule=schedule, y=y)
            i += n
            z = self.normalizer.decode(z)
            if decode and self.decoder is not None:
                z = self.decoder(z)
            yield z.float().cpu()


def assemble_run(
    cfg: TrainConfig,
    shape: tuple[int, ...],
    state: dict[str, torch.Tensor],
    normalizer: Normalizer,
    step: int,
    weights: str,
    *,
    class_names: list[str] | None,
    latents: dict | None,
    device: torch.device | str,
    vae: str | None,
    mismatch: str,
) -> TrainedRun:
    """A :class:`TrainedRun` from its configuration and the network's state dict (for
    :func:`load_run` and :mod:`meanflow.runs.pretrained`): the network built from ``cfg``, ``state``
    loaded strictly (a mismatch is one error line starting with ``mismatch``), in eval mode on
    ``device``; for a latent run its VAE decoder (``vae`` overrides the recorded folder)."""
    device = resolve_device(device) if isinstance(device, str) else device
    model = build_model(cfg, shape, cfg.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MeanFlowError(f"{mismatch} ({str(exc).splitlines()[0][:200]})") from None
    decoder = None
    if latents:
        decoder = latent_decoder(latents, device, vae, required=vae is not None)
    return TrainedRun(
        model.to(device).eval(), cfg, normalizer, step, weights, shape, class_names, decoder,
        latents,
    )  # fmt: skip


def weights_name(weights: str, emas: dict[str, float], run_dir: str = "") -> str:
    """The checkpoint name of ``weights``: ``"raw"``, or the name in ``emas`` (name -> decay:
    ``"ema"`` the primary, ``"ema-<decay>"`` the extras) of an EMA given by name or decay."""
    text = str(weights).strip()
    if text == "raw" or text in emas:
        return text
    try:
        decay = float(text.removeprefix("ema-"))
    except ValueError:
        decay = None
    for name, value in emas.items():
        if decay is not None and float(value) == decay:
            return name
    choices = ", ".join(["raw"] + [f"{n} ({v})" if n == "ema" else n for n, v in emas.items()])
    raise MeanFlowError(f"weights {text!r} are not in run {run_dir!r}; choose one of {choices}")


def parse_classes(text: Classes, num: int, run, seed: int, option: str = "--class"):
    """Labels (num,) for ``--class`` (see its help) or ``classes=`` of :meth:`TrainedRun.sample`.

    ``text`` is a class name or index, a comma-separated string or a list of them (cycled over
    the ``num`` samples), ``"random"`` (uniform, seeded by ``seed + 1``) or ``"none"`` (returns
    None: the null label). None (the option left out) gives ``i mod K``, one grid column per
    class; an unconditional run gives None. ``option`` names the argument in error messages.
    """
    k = run.num_classes
    if k == 0:
        check(text is None, f"{option} needs a class-conditional run; this run is unconditional")
        return None
    if text is None:
        return grid_labels(num, k)
    if isinstance(text, str) and text.strip().lower() == "none":
        return None
    if isinstance(text, str) and text.strip().lower() == "random":
        return torch.randint(0, k, (num,), generator=torch.Generator().manual_seed(seed + 1))
    items: list[str | int | np.integer]
    if isinstance(text, str):
        items = [v.strip() for v in text.split(",")]
    elif isinstance(text, (int, np.integer)):
        items = [text]
    else:
        items = list(text.tolist() if hasattr(text, "tolist") else text)
    check(len(items) > 0, f"{option} is empty; give class names or indices")
    names = run.class_names or [str(i) for i in range(k)]
    labels = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < k:
            labels.append(int(item))
        elif isinstance(item, str) and item.isdigit() and int(item) < k:
            labels.append(int(item))
        elif isinstance(item, str) and item in names:
            labels.append(names.index(item))
        else:
            hint = _suggest(item, names) if isinstance(item, str) and not item.isdigit() else ""
            raise MeanFlowError(
                f"{option} {item!r} is not a class of this run{hint}; use "
                f"0..{k - 1}, one of {', '.join(names[:10])}"
                f"{', ...' if k > 10 else ''}, 'random' or 'none'"
            )
    return torch.tensor(labels)[torch.arange(num) % len(labels)]
