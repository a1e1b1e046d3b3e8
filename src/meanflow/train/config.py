"""Run configuration: nested dataclasses, named presets and ``--set key=value`` overrides.

A run is fully described by :class:`TrainConfig`, saved as ``config.json`` in the run directory
and inside every checkpoint. Presets are dotted overrides on the defaults; ``--set`` applies
more overrides after the preset (e.g. ``--set time.ratio=0.5 --set optim.lr=3e-4``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import MeanFlowError, check
from ..times import TimeSampler

OBJECTIVES = ("meanflow", "flow-matching")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ModelConfig:
    """Network settings (vector data: the MLP of meanflow.nn.mlp)."""

    arch: str = "mlp"
    hidden: int = 256
    depth: int = 4
    time_input: str = "t,t-r"
    time_dim: int = 32


@dataclass
class LossConfig:
    """Adaptive weighting ``1 / sg((err + c)^p)`` and where the JVP runs."""

    p: float = 1.0
    c: float = 1e-3
    jvp: str = "subset"


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping (the gradient norm is still logged)
    schedule: str = "constant"  # or "cosine": lr decays to 0 at the last step
    warmup: int = 0             # steps of linear warm-up from 0

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
    num_data: int = 100_000       # samples drawn from a built-in distribution
    normalize: bool = True        # standardize each dimension; samples are mapped back
    ema_decay: float = 0.999
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    sample_num: int = 5000        # points in the scatter plot written at the end of training
    model: ModelConfig = field(default_factory=ModelConfig)
    time: TimeSampler = field(default_factory=TimeSampler)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        check(self.objective in OBJECTIVES,
              f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        check(self.optim.name in OPTIMIZERS,
              f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.optim.name!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints",
                     "num_data", "sample_num"):
            value = getattr(self, name)
            check(value >= 1, f"{name} must be >= 1, got {value}")
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}")
        check(self.optim.schedule in LR_SCHEDULES, f"optim.schedule must be one of "
              f"{', '.join(LR_SCHEDULES)}, got {self.optim.schedule!r}")
        check(self.optim.warmup >= 0, f"optim.warmup must be >= 0, got {self.optim.warmup}")
        check(self.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.optim.grad_clip}")
        for beta in ("beta1", "beta2"):
            value = getattr(self.optim, beta)
            check(0.0 <= value < 1.0, f"optim.{beta} must be in [0, 1), got {value}")
        TimeSampler(**dataclasses.asdict(self.time))  # re-run its checks after --set
        check(self.loss.p >= 0 and self.loss.c > 0,
              f"loss.p must be >= 0 and loss.c > 0, got p={self.loss.p}, c={self.loss.c}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        cfg = cls()
        for key, value in _flatten(data).items():
            set_value(cfg, key, value)
        return cfg


# Presets: dotted overrides on the defaults. Sources and measurements are in docs/presets.md.
PRESETS: dict[str, dict[str, Any]] = {
    # Generic MLP for vector data of any dimension.
    "mlp": {},
    # 2-D toy data on 2 CPU cores in under 3 minutes (tuned by benchmarks/toy_quality.py).
    # The authors' improved CIFAR-10 time recipe (t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6), 75%
    # r != t) with the plain squared error (p = 0) and a cosine lr; chosen by the sweep in
    # docs/benchmarks.md.
    "toy-2d": {"steps": 8000, "batch_size": 1024, "model.hidden": 256, "model.depth": 4,
               "optim.lr": 1e-3, "optim.schedule": "cosine", "ema_decay": 0.999,
               "time.mean": -0.6, "time.std": 1.6, "time.r_mean": -4.0, "time.r_std": 1.6,
               "time.ratio": 0.75, "loss.p": 0.0},
    # A few-second smoke run (tests, CI).
    "tiny": {"steps": 50, "batch_size": 128, "model.hidden": 32, "model.depth": 2,
             "num_data": 2000, "log_every": 10, "ckpt_every": 25, "sample_num": 500},
}


PRESET_HELP = {
    "mlp": "vector data of any dimension (default when D != 2)",
    "toy-2d": "2-D data, about 3 minutes on 2 CPU cores (default when D = 2); chosen with "
              "benchmarks/toy_quality.py, see docs/benchmarks.md",
    "tiny": "a few-second smoke run (tests)",
}

KEY_HELP = {
    "data": "built-in distribution name or .npy/.npz path (`--data`)",
    "preset": "name of the preset applied (`--preset`)",
    "objective": "`meanflow` or `flow-matching` (`--objective`)",
    "steps": "optimizer steps in total (`--steps`)",
    "batch_size": "samples per step (`--batch-size`)",
    "seed": "seed of initialization, data order, noise and times (`--seed`)",
    "num_data": "points drawn from a built-in distribution as the training set",
    "normalize": "standardize each dimension with the training set's mean and std; samples "
                 "are mapped back",
    "ema_decay": "EMA decay, warmed up as min(decay, (1+n)/(10+n)); sampling uses the EMA",
    "log_every": "steps between metrics.jsonl records",
    "ckpt_every": "steps between checkpoints (one is always written at the end)",
    "keep_checkpoints": "newest checkpoints kept in checkpoints/",
    "sample_num": "points in samples-1step.png, written at the end of training",
    "model.arch": "network: `mlp`",
    "model.hidden": "MLP width",
    "model.depth": "MLP hidden layers",
    "model.time_input": "time quantities the network sees: `t,t-r`, `t,r`, `t,r,t-r`, `t-r` "
                        "(paper Table 1c)",
    "model.time_dim": "sinusoidal features per time quantity",
    "time.dist": "`logit-normal` or `uniform`",
    "time.mean": "logit-normal mean of t (and of r unless time.r_mean is set)",
    "time.std": "logit-normal std of t (and of r unless time.r_std is set)",
    "time.r_mean": "logit-normal mean of r's draw (None: same as t)",
    "time.r_std": "logit-normal std of r's draw (None: same as t)",
    "time.ratio": "fraction of samples with r != t (0: flow-matching targets only)",
    "loss.p": "adaptive weight power, loss = err / sg((err + c)^p); 0 is the plain squared error",
    "loss.c": "adaptive weight constant c",
    "loss.jvp": "`subset` (JVP only on r != t samples, its output reused for the loss), "
                "`full` (whole batch, as the authors' code) or `detached` (JVP without graph, "
                "then one plain forward; fastest, see docs/method.md); same loss and gradients",
    "optim.name": "`adam` or `adamw`",
    "optim.lr": "peak learning rate",
    "optim.beta1": "Adam beta1",
    "optim.beta2": "Adam beta2",
    "optim.weight_decay": "weight decay (decoupled for adamw)",
    "optim.grad_clip": "clip the gradient norm to this value (0: off; the norm is logged)",
    "optim.schedule": "`constant`, or `cosine` decay to 0 at the last step (resuming with a "
                      "larger --steps stretches the cosine)",
    "optim.warmup": "linear warm-up steps",
}


def default_preset(dim: int) -> str:
    """The preset chosen when none is given: ``toy-2d`` for 2-D data, ``mlp`` otherwise."""
    return "toy-2d" if dim == 2 else "mlp"


def apply_preset(cfg: TrainConfig, name: str) -> None:
    if name not in PRESETS:
        raise MeanFlowError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: "
                            f"{', '.join(PRESETS)}")
    for key, value in PRESETS[name].items():
        set_value(cfg, key, value)
    cfg.preset = name


def configure(base: TrainConfig, preset: str | None = None,
              settings: list[tuple[str, Any]] = ()) -> TrainConfig:
    """A copy of ``base`` with ``preset`` applied (if given), then each dotted ``(key, value)``
    of ``settings`` in order: the precedence of the command line."""
    cfg = TrainConfig.from_dict(base.to_dict())
    if preset is not None:
        apply_preset(cfg, preset)
    for key, value in settings:
        set_value(cfg, key, value)
    return cfg


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys that ``--set`` accepts."""
    cfg = TrainConfig() if cfg is None else cfg
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (a string from the command line or a JSON value) to type ``hint``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    target = args[0] if optional and args else hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            number = float(value)  # accepts "1e4"; "2.5" and "1.5e0" are refused below
            if not number.is_integer():
                raise ValueError
            return int(number)
        if target is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(target, "a text")
        raise MeanFlowError(f"{key} expects {kind}, got {value!r}") from None


def set_value(cfg: Any, key: str, value: Any) -> None:
    """Set dotted ``key`` (e.g. ``time.ratio``) on ``cfg``, converting ``value`` to the field type."""
    parts = key.split(".")
    target = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            full = ".".join(parts[:i + 1])
            raise MeanFlowError(f"unknown config key {key!r}{_suggest(full, config_keys())}; "
                                "run 'meanflow train --help' for the list of keys")
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise MeanFlowError(f"config key {'.'.join(parts[:i + 1])!r} has no sub-keys")
    hints = typing.get_type_hints(type(target))
    if dataclasses.is_dataclass(getattr(target, parts[-1])):
        raise MeanFlowError(f"config key {key!r} is a group; set one of its keys, e.g. "
                            f"{key}.{dataclasses.fields(getattr(target, parts[-1]))[0].name}")
    setattr(target, parts[-1], _convert(key, value, hints[parts[-1]]))


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        check(bool(sep) and bool(key.strip()), f"--set expects key=value, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs
