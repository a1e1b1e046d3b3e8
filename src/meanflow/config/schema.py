"""Run configuration: nested dataclasses, named presets and ``--set key=value`` overrides.

A run is fully described by :class:`TrainConfig`, saved as ``config.json`` in the run directory
and inside every checkpoint. Presets are dotted overrides on the defaults; ``--set`` applies
more overrides after the preset (e.g. ``--set time.ratio=0.5 --set optim.lr=3e-4``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import check
from ..flow.jvp import FD_SCHEMES, JVP_BACKENDS
from ..flow.times import TimeSampler
from ..objectives.registry import OBJECTIVES as _OBJECTIVE_REGISTRY
from .overrides import dotted_keys, flatten, set_value

# the registry's names, a live view (meanflow, flow-matching, imf, alphaflow; and any added)
OBJECTIVES = _OBJECTIVE_REGISTRY.keys()
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


ARCHS = ("mlp", "unet", "songunet", "dit")
TANGENTS = {"v,0,1": (0.0, 1.0), "v,0,0": (0.0, 0.0), "v,1,0": (1.0, 0.0), "v,1,1": (1.0, 1.0)}


@dataclass
class ModelConfig:
    """Network settings: the MLP (vectors), the U-Net or the DiT (images, latents)."""

    arch: str = "mlp"
    hidden: int = 256
    depth: int = 4
    time_input: str = "t,t-r"
    time_dim: int = 32
    size: str = ""  # U-Net config name or DiT "SIZE/PATCH"
    channels: int = 0  # U-Net base channels (0: the size's default)
    blocks: int = 0  # U-Net ResBlocks per level (0: the size's default)
    dropout: float = -1.0  # U-Net dropout (-1: the size's default)
    aux_head: bool = False  # imf: the authors' auxiliary velocity head (a second output)
    aux_depth: int = 0  # dit with aux_head: last blocks branched per head (authors' B/2: 8)
    z_features: int = 0  # mlp: Fourier features sin/cos(2^k z), k < z_features, beside z


@dataclass
class GuidanceConfig:
    """Classifier-free guidance in the target (meanflow.objectives.guidance); class-conditional
    runs only."""

    omega: float = 1.0
    kappa: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    label_dropout: float = 0.1
    drop_rows: str = "r=t"  # null labels only on r = t rows (the authors'), or "any"
    inputs: bool = False  # imf: scale and interval as network inputs, chosen when sampling
    omega_max: float = 8.0  # imf with inputs: omega log-uniform on [1, omega_max]


@dataclass
class AlphaConfig:
    """AlphaFlow's curriculum (meanflow.objectives.alphaflow.alpha_schedule);
    ``objective=alphaflow`` only."""

    start: float = 1.0
    end: float = 0.0
    gamma: float = 25.0
    begin: float = 0.0  # window start, fraction of the run
    finish: float = 1.0  # window end, fraction of the run
    snap: float = 0.005  # alpha below snap -> 0, above 1 - snap -> 1


@dataclass
class LossConfig:
    """Adaptive weighting ``1 / sg((err + c)^p)`` and where the JVP runs."""

    p: float = 1.0
    c: float = 1e-3
    jvp: str = "subset"
    jvp_dtype: str = "float32"  # or "autocast": the JVP in the run's precision (e.g. bf16)
    jvp_backend: str = "forward-ad"  # or "func", "finite-difference" (docs/method.md)
    fd_step: float = 0.0  # finite-difference step h (0: the scheme's measured default)
    fd_scheme: str = "forward"  # or "central"
    tangent: str = "v,0,1"  # JVP tangent on (z, r, t); others only for ablations (Table 1b)
    self_velocity: float = 0.0  # share of the network's own u(z, t, t) in the r != t rows' v

    @property
    def time_tangent(self) -> tuple[float, float]:
        """``(dr, dt)`` of ``tangent``."""
        return TANGENTS[self.tangent]


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping (the gradient norm is still logged)
    schedule: str = "constant"  # or "cosine": lr decays to 0 at the last step
    warmup: int = 0  # steps of linear warm-up from 0
    fused: str = "auto"  # fused Adam kernel: auto (on CUDA), on, off

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.schedule == "cosine":
            progress = min(1.0, max(0.0, (step - self.warmup) / max(1, total - self.warmup)))
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * factor


@dataclass
class TrainConfig:
    data: str = "checkerboard"
    preset: str = "mlp"
    objective: str = "meanflow"
    steps: int = 5000
    batch_size: int = 1024
    seed: int = 0
    num_data: int = 100_000  # samples drawn from a built-in distribution
    normalize: bool = True  # standardize each dimension; samples are mapped back
    ema_decay: float = 0.999
    ema_extra: str = ""  # extra EMA decays, comma-separated (e.g. "0.99995,0.9996")
    ema_every: int = 1  # update the EMAs every k optimizer steps with decay^k
    ema_warmup: bool = True  # decay min(d, (1+n)/(10+n)); false: constant d (authors)
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    sample_num: int = 5000  # points in the scatter plot written at the end of training
    data_dir: str = ""  # folder of fashion-mnist / cifar10 files
    image_size: int = 0  # resize folder images (digits: 8, 16 or 32); 0: native
    hflip: bool = False  # random horizontal flips (images; latents encoded with --flip)
    augment: str = ""  # augmentation pipeline: "" (none) or "edm-cifar10"
    augment_p: float = 0.12  # its probability per transformation (EDM's p)
    conditional: bool = True  # use the data's labels when it has them
    data_shape: str = ""  # one sample's shape, e.g. 1x28x28 (set from the data)
    num_classes: int = 0  # classes the network is conditioned on (set from the data)
    grid_every: int = 1000  # steps between sample grids of image runs (0: end only)
    grid_num: int = 100  # images in each grid
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size splits evenly)
    max_bad_steps: int = 20  # consecutive non-finite steps that stop the run
    precision: str = "fp32"  # "bf16": the network under bf16 autocast (fp32 weights)
    compile: bool = False  # torch.compile the network
    tf32: bool = True  # TF32 matrix products on CUDA
    stream: bool = False  # read batches through DataLoader workers (latents: always)
    init: str = ""  # start the network from this run's EMA weights (train/warm_start.py)
    workers: int = 2  # DataLoader worker processes of a streamed run
    model: ModelConfig = field(default_factory=ModelConfig)
    time: TimeSampler = field(default_factory=TimeSampler)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)

    @property
    def shape(self) -> tuple[int, ...]:
        """``data_shape`` as a tuple ((D,) or (C, H, W)); () when not known yet."""
        return parse_shape(self.data_shape)

    def validate(self) -> None:
        check(
            self.objective in OBJECTIVES,
            f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
        )
        check(
            self.optim.name in OPTIMIZERS,
            f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.optim.name!r}",
        )
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
            "num_data",
            "sample_num",
            "grid_num",
            "grad_accum",
            "max_bad_steps",
        ):
            value = getattr(self, name)
            check(value >= 1, f"{name} must be >= 1, got {value}")
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        extras = self.ema_extras
        check(
            len(set(extras) | {self.ema_decay}) == len(extras) + 1,
            f"ema_extra {self.ema_extra!r} repeats a decay (ema_decay is {self.ema_decay})",
        )
        check(self.ema_every >= 1, f"ema_every must be >= 1, got {self.ema_every}")
        check(self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}")
        check(
            self.optim.schedule in LR_SCHEDULES,
            f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.optim.schedule!r}",
        )
        check(self.optim.warmup >= 0, f"optim.warmup must be >= 0, got {self.optim.warmup}")
        check(
            self.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.optim.grad_clip}"
        )
        for beta in ("beta1", "beta2"):
            value = getattr(self.optim, beta)
            check(0.0 <= value < 1.0, f"optim.{beta} must be in [0, 1), got {value}")
        TimeSampler(**dataclasses.asdict(self.time))  # re-run its checks after --set
        check(
            self.loss.p >= 0 and self.loss.c > 0,
            f"loss.p must be >= 0 and loss.c > 0, got p={self.loss.p}, c={self.loss.c}",
        )
        check(
            0.0 <= self.loss.self_velocity <= 1.0,
            f"loss.self_velocity must be in [0, 1], got {self.loss.self_velocity}",
        )
        check(
            self.model.arch in ARCHS,
            f"model.arch must be one of {', '.join(ARCHS)}, got {self.model.arch!r}",
        )
        check(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        check(
            self.loss.jvp_dtype in ("float32", "autocast"),
            f"loss.jvp_dtype must be float32 or autocast, got {self.loss.jvp_dtype!r}",
        )
        check(
            self.loss.jvp_backend in JVP_BACKENDS,
            "loss.jvp_backend must be one of "
            f"{', '.join(JVP_BACKENDS)}, got {self.loss.jvp_backend!r}",
        )
        check(
            self.loss.fd_scheme in FD_SCHEMES,
            f"loss.fd_scheme must be one of {', '.join(FD_SCHEMES)}, got {self.loss.fd_scheme!r}",
        )
        check(
            self.loss.tangent in TANGENTS,
            f"loss.tangent must be one of {', '.join(TANGENTS)}, got {self.loss.tangent!r}",
        )
        check(
            self.loss.tangent == "v,0,1" or self.loss.jvp_backend != "finite-difference",
            "loss.tangent other than v,0,1 needs an exact loss.jvp_backend (forward-ad, func)",
        )
        check(
            0 <= self.loss.fd_step <= 0.5,
            f"loss.fd_step must be in [0, 0.5] (0: default), got {self.loss.fd_step}",
        )
        check(
            self.optim.fused in ("auto", "on", "off"),
            f"optim.fused must be auto, on or off, got {self.optim.fused!r}",
        )
        check(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        check(0 <= self.augment_p <= 1, f"augment_p must be in [0, 1], got {self.augment_p}")
        check(
            self.batch_size % self.grad_accum == 0,
            f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}",
        )
        check(self.grid_every >= 0, f"grid_every must be >= 0, got {self.grid_every}")
        check(self.image_size >= 0, f"image_size must be >= 0, got {self.image_size}")
        check(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        check(
            self.model.dropout == -1.0 or 0 <= self.model.dropout < 1,
            f"model.dropout must be in [0, 1) (or -1: default), got {self.model.dropout}",
        )
        g = self.guidance
        check(
            g.omega > 0 and g.kappa < 1,
            f"guidance needs omega > 0 and kappa < 1, got omega={g.omega}, kappa={g.kappa}",
        )
        check(
            0 <= g.t_min <= g.t_max <= 1,
            f"guidance needs 0 <= t_min <= t_max <= 1, got [{g.t_min}, {g.t_max}]",
        )
        check(
            0 <= g.label_dropout <= 1,
            f"guidance.label_dropout must be in [0, 1], got {g.label_dropout}",
        )
        check(
            g.drop_rows in ("r=t", "any"),
            f"guidance.drop_rows must be r=t or any, got {g.drop_rows!r}",
        )
        check(
            not g.inputs or self.objective == "imf",
            f"guidance.inputs=true is improved "
            f"MeanFlow's guidance (--objective imf), not {self.objective}'s",
        )
        check(g.omega_max >= 1, f"guidance.omega_max must be >= 1, got {g.omega_max}")
        self._check_network_options()
        a = self.alpha
        check(
            0 <= a.start <= 1 and 0 <= a.end <= 1 and a.gamma > 0 and 0 <= a.snap < 0.5,
            f"alpha needs start and end in [0, 1], gamma > 0 and snap in [0, 0.5), got "
            f"start={a.start}, end={a.end}, gamma={a.gamma}, snap={a.snap}",
        )
        check(
            0 <= a.begin < a.finish <= 1,
            f"alpha needs 0 <= begin < finish <= 1 (fractions "
            f"of the run), got [{a.begin}, {a.finish}]",
        )
        parse_shape(self.data_shape)

    def _check_network_options(self) -> None:
        """The network options that only some architectures or objectives take."""
        m = self.model
        check(
            not m.aux_head or self.objective == "imf",
            f"model.aux_head=true is improved MeanFlow's velocity head (--objective imf), "
            f"not {self.objective}'s",
        )
        check(
            not m.aux_head or m.arch in ("mlp", "unet", "dit"),
            f"model.aux_head=true is built for the mlp, unet and dit networks, not {m.arch}",
        )
        check(
            m.aux_depth == 0 or (m.aux_head and m.arch == "dit"),
            "model.aux_depth (blocks per head) needs model.aux_head=true and model.arch=dit",
        )
        check(
            m.z_features == 0 or (m.arch == "mlp" and m.z_features > 0),
            f"model.z_features is the mlp's input encoding (>= 0), got {m.z_features} "
            f"with model.arch={m.arch}",
        )

    @property
    def ema_extras(self) -> tuple[float, ...]:
        """The decays of ``ema_extra`` (each checked to lie in [0, 1))."""
        decays = []
        for item in filter(None, (v.strip() for v in str(self.ema_extra).split(","))):
            try:
                decays.append(float(item))
            except ValueError:
                decays.append(math.nan)
            check(
                0.0 <= decays[-1] < 1.0,
                f"ema_extra needs comma-separated decays in [0, 1), got {item!r}",
            )
        return tuple(decays)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        for key, value in flatten(data).items():
            set_value(cfg, key, value)
        return cfg


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x28x28"`` -> (1, 28, 28); ``""`` -> ()."""
    if not text:
        return ()
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    check(
        len(shape) in (1, 3) and all(v > 0 for v in shape),
        f"data_shape must look like D or CxHxW (e.g. 4x32x32), got {text!r}",
    )
    return shape


def format_shape(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def config_keys(cfg: Any = None) -> list[str]:
    """All dotted keys that ``--set`` accepts (of ``cfg``, default a :class:`TrainConfig`)."""
    return dotted_keys(TrainConfig() if cfg is None else cfg)
