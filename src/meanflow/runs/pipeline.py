"""``MeanFlowPipeline``: a meanflow model as a diffusers pipeline (``pip install
'meanflow[diffusers]'``), stepping with diffusers' ``FlowMapEulerDiscreteScheduler``.

That scheduler's step is MeanFlow's sampler exactly: from ``timestep`` t to the next one r,

    z_r = z_t - (t - r) * u(z_t, r, t),

with sigmas falling uniformly from 1 to 0 (``shift=1``), so one step is ``x = e - u(e, 0, 1)``.
The pipeline follows diffusers' conventions (``generator=``, ``num_inference_steps``,
``class_labels``, ``latents``, ``output_type="pil" | "np" | "pt"``, a progress bar) and decodes
latent models with their VAE::

    pipe = MeanFlowPipeline.from_pretrained("exported/fmnist")   # or a training run directory
    images = pipe(batch_size=16, class_labels=[7] * 16, generator=torch.manual_seed(0)).images

For the same noise it returns what :meth:`meanflow.runs.run.TrainedRun.sample` computes (the
test checks this). ``save_pretrained`` writes the network as :mod:`meanflow.runs.pretrained` does,
plus the scheduler's config in ``scheduler/``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..data.vae import latent_decoder
from ..errors import MeanFlowError, check
from .load import from_pretrained
from .pretrained import save_pretrained

try:
    from diffusers import DiffusionPipeline, ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # pragma: no cover - the optional extra is missing
    raise MeanFlowError(
        "MeanFlowPipeline needs diffusers: pip install 'meanflow[diffusers]'"
    ) from None
try:
    from diffusers import FlowMapEulerDiscreteScheduler
except ImportError:  # pragma: no cover - an older diffusers
    FlowMapEulerDiscreteScheduler = None


def flow_map_scheduler(folder: str | None = None) -> Any:
    """diffusers' ``FlowMapEulerDiscreteScheduler`` with meanflow's times (no shift), or the one
    saved in ``folder``/scheduler."""
    check(
        FlowMapEulerDiscreteScheduler is not None,
        "this diffusers has no FlowMapEulerDiscreteScheduler; upgrade it (pip install -U "
        "diffusers) to use MeanFlowPipeline",
    )
    if folder is not None:
        return FlowMapEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class MeanFlowPipeline(DiffusionPipeline):
    """Sampling a meanflow network in ``num_inference_steps`` steps (default 1).

    Components: ``network`` (any ``model(z, r, t, y=None) -> u``), ``scheduler`` (a
    ``FlowMapEulerDiscreteScheduler``) and ``vae`` (a diffusers ``AutoencoderKL`` for latent
    models, else None). ``run`` is the :class:`~meanflow.runs.run.TrainedRun` it was built
    from: its sample shape, classes and data normalizer."""

    model_cpu_offload_seq = "network->vae"

    def __init__(self, network: torch.nn.Module, scheduler: Any, vae: Any = None) -> None:
        super().__init__()
        self.register_modules(network=network, scheduler=scheduler, vae=vae)
        self.run: Any = None

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (our networks are plain ``nn.Module``s)."""
        weight = next(iter(self.network.parameters()), None)
        return torch.device("cpu") if weight is None else weight.device

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    def to(self, *args: Any, **kwargs: Any) -> MeanFlowPipeline:
        """Move the network (and the VAE) like ``nn.Module.to``; returns the pipeline."""
        self.network.to(*args, **kwargs)
        if self.vae is not None:
            self.vae.to(*args, **kwargs)
        return self

    @classmethod
    def from_run(cls, run: Any, scheduler: Any = None, vae: str | None = None):
        """The pipeline of a :class:`~meanflow.runs.run.TrainedRun`, or of a path that
        :func:`meanflow.from_pretrained` reads (an exported folder or a training run)."""
        if isinstance(run, (str, os.PathLike)):
            run = from_pretrained(str(run), vae=vae)
        elif vae is not None and run.latents:  # a loaded run, decoded with another VAE
            run = dataclasses.replace(run, decoder=latent_decoder(run.latents, run.device, vae))
        # the run's own decoder (its VAE loaded once) decodes; its module is the `vae` component
        pipe = cls(run.model, scheduler or flow_map_scheduler(), getattr(run.decoder, "vae", None))
        pipe.run = run
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any):
        """:meth:`from_run` of a meanflow folder (``device=`` moves the pipeline there)."""
        device = kwargs.pop("device", None)
        path = str(pretrained_model_name_or_path)
        saved = os.path.isdir(os.path.join(path, "scheduler"))
        scheduler = flow_map_scheduler(path) if saved else None
        pipe = cls.from_run(path, scheduler=scheduler, vae=kwargs.pop("vae", None))
        check(not kwargs, f"unsupported arguments: {', '.join(sorted(kwargs))}")
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The network as :func:`meanflow.runs.pretrained.save_pretrained` writes it, and the
        scheduler's config in ``scheduler/`` (``overwrite=True`` replaces an exported model)."""
        check(self.run is not None, "this pipeline was not built from a meanflow model")
        save_pretrained(self.run, save_directory, overwrite=kwargs.pop("overwrite", False))
        self.scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))

    def _labels(self, class_labels: Any, batch_size: int, device) -> torch.Tensor | None:
        classes = self.run.num_classes
        if class_labels is None:
            return None  # the null label: unconditional samples
        check(classes > 0, "class_labels given, but this model is unconditional")
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * batch_size
        names = self.run.class_names or []
        labels = [names.index(c) if isinstance(c, str) and c in names else c for c in class_labels]
        check(
            all(isinstance(c, int) and 0 <= c < classes for c in labels),
            f"class_labels must be class indices 0..{classes - 1} or names of this model's "
            f"classes, got {list(class_labels)[:8]}",
        )
        check(len(labels) == batch_size, f"{len(labels)} class_labels for {batch_size} samples")
        return torch.tensor(labels, device=device)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1,
        class_labels: Any = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_scale: float = 1.0,
    ):
        """Samples from noise ``latents`` (drawn with ``generator`` when None) in
        ``num_inference_steps`` steps. ``class_labels``: indices or class names (one, or one per
        sample; None: unconditional). Images come as PIL images (``"pil"``), an (N, H, W, C)
        array in [0, 1] (``"np"``) or an (N, C, H, W) tensor in [0, 1] (``"pt"``); vector data
        as an (N, D) array (``"np"``) or tensor (``"pt"``) in data units. ``guidance_scale``
        != 1: the scale input of a model trained with guidance inputs (improved MeanFlow), else
        classifier-free guidance at sampling time (two evaluations per step), as
        ``TrainedRun.sample(guidance=...)``."""
        check(self.run is not None, "build the pipeline with MeanFlowPipeline.from_run(...)")
        check(
            output_type in ("pil", "np", "pt"),
            f"output_type must be pil, np or pt, got {output_type!r}",
        )
        check(
            self.run.is_image or output_type != "pil",
            "this model makes vectors, not images: use output_type='np' or 'pt'",
        )
        device = self._execution_device
        shape = (batch_size, *self.run.shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        check(
            tuple(latents.shape) == shape,
            f"latents must have shape {shape}, got {tuple(latents.shape)}",
        )
        y = self._labels(class_labels, batch_size, device)
        network = self.run.guided_model(guidance_scale, labelled=y is not None)
        z = latents.to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sigmas = self.scheduler.sigmas
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t = sigmas[i].to(z.dtype).expand(batch_size)
            r = sigmas[i + 1].to(z.dtype).expand(batch_size)
            u = network(z, r, t, y=y)
            z = self.scheduler.step(u, timestep, z).prev_sample
        x = self.run.normalizer.decode(z)
        if self.run.decoder is not None:
            x = self.run.decoder(x)
        x = x.float().cpu()
        if self.run.is_image or self.run.decoder is not None:
            x = ((x + 1) / 2).clamp(0, 1)
            if output_type == "np":
                x = x.permute(0, 2, 3, 1).numpy()
            elif output_type == "pil":
                x = self.numpy_to_pil(x.permute(0, 2, 3, 1).numpy())
        elif output_type == "np":
            x = x.numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (x,)
        return ImagePipelineOutput(images=x)


__all__ = ["MeanFlowPipeline", "flow_map_scheduler"]
