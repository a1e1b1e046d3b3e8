"""A trained model as a Hugging Face-style folder: ``config.json`` + ``model.safetensors``.

    run = meanflow.load_run("runs/fmnist")            # a training run
    run.save_pretrained("exported/fmnist")            # or: meanflow export --run ... --out ...
    run = meanflow.from_pretrained("exported/fmnist")  # the same network, bit for bit

``model.safetensors`` holds the network's state dict alone (the weights chosen when the run was
loaded, the primary EMA by default), as ``diffusers``/``transformers`` models store theirs.
``config.json`` holds what rebuilds it and maps its output to data units: the training
configuration (network, objective, guidance), one sample's shape, the class names, the data
normalizer, the step, which weights these are and, for a latent run, the VAE facts. Loading
reads local files only; a Hub repository id is fetched with ``huggingface_hub`` (an optional
dependency) when it is not a local folder, and :func:`push_to_hub` uploads an exported folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import torch

from .._version import __version__
from ..config.build import count_parameters
from ..config.schema import TrainConfig
from ..errors import MeanFlowError, check
from .run import Normalizer, TrainedRun, assemble_run

if TYPE_CHECKING:
    from .run import TrainedRun

FORMAT = "meanflow-pretrained"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


def save_pretrained(
    run: TrainedRun, directory: str, overwrite: bool = False, name: str | None = None
) -> str:
    """Write ``run`` to ``directory``: ``config.json``, ``model.safetensors`` and a model card
    ``README.md`` that loads it from ``name`` (default ``directory``). Returns the directory.
    An existing non-empty folder is replaced only with ``overwrite``, and then only if it holds
    an exported model (never a training run or other files)."""
    from safetensors.torch import save_file

    if os.path.exists(directory):
        check(os.path.isdir(directory), f"{directory!r} is a file; give a directory to export to")
        entries = set(os.listdir(directory))
        check(
            not entries or overwrite,
            f"{directory!r} already exists; pass --overwrite "
            "(Python: overwrite=True) to replace the model in it, or choose another name",
        )
        others = ", ".join(sorted(entries - {CONFIG_NAME, WEIGHTS_NAME, "README.md", "scheduler"}))
        check(
            not others,
            f"{directory!r} holds other files ({others[:200]}); export into an empty or new folder",
        )
    state = {k: v.detach().cpu().contiguous().clone() for k, v in run.model.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meanflow_version": __version__,
        "step": run.step,
        "weights": run.weights,
        "shape": list(run.shape),
        "class_names": run.class_names,
        "latents": run.latents,
        "normalizer": {"mean": run.normalizer.mean.tolist(), "std": run.normalizer.std.tolist()},
        "train_config": run.config.to_dict(),
    }
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    # written beside the target, then moved in: a failure never leaves half a model there
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1)
        with open(os.path.join(tmp, CARD_NAME), "w") as f:
            f.write(model_card(run, name or directory))
        os.makedirs(directory, exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


_OBJECTIVE_NAMES = {"meanflow": "MeanFlow", "flow-matching": "Flow matching",
                    "imf": "Improved MeanFlow", "alphaflow": "AlphaFlow"}  # fmt: skip


def model_card(run: TrainedRun, name: str) -> str:
    """A Hub model card (``README.md``): metadata for the Hub, what the model is, and how to load
    it from ``name`` (the folder or Hub repository)."""
    cfg = run.config

    params = count_parameters(run.model)
    classes = f"{cfg.num_classes} classes" if cfg.num_classes else "unconditional"
    shape = "x".join(map(str, run.shape))
    tags = ["meanflow", "one-step-generation"]
    tags += [cfg.objective] if cfg.objective not in tags else []
    steps = 100 if cfg.objective == "flow-matching" else 1
    how = (
        "It is a velocity field: sample it with many Euler steps."
        if steps > 1
        else "One sample is one network evaluation, `x = e - u(e, 0, 1)`."
    )
    tag_lines = "".join(f"- {t}\n" for t in tags)
    return f"""---
library_name: meanflow
tags:
{tag_lines}---

# {_OBJECTIVE_NAMES.get(cfg.objective, cfg.objective)} model on {cfg.data or "custom data"}

A `{cfg.model.arch}` network ({params:,} parameters; samples of shape {shape}; {classes})
trained with the `{cfg.objective}` objective of the `meanflow` library (MeanFlow:
arXiv 2505.13447) for {run.step:,} steps (preset `{cfg.preset}`); these are its
`{run.weights}` weights. {how}

```python
import meanflow

run = meanflow.from_pretrained("{name}")
samples = run.sample(16, steps={steps})
```

`config.json` holds the full training configuration; `model.safetensors` the weights.
"""


def is_pretrained(directory: str) -> bool:
    """Whether ``directory`` holds an exported model (as opposed to a training run)."""
    return os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(
        os.path.join(directory, WEIGHTS_NAME)
    )


def load_folder(path: str, device, vae: str | None) -> TrainedRun:
    """The model in the exported folder ``path`` (:func:`from_pretrained` without the Hub)."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise MeanFlowError(f"cannot read {os.path.join(path, CONFIG_NAME)!r}: {exc}") from None
    check(
        isinstance(config, dict) and config.get("format") == FORMAT,
        f'{path!r}: {CONFIG_NAME} is not a meanflow model\'s (no "format": "{FORMAT}")',
    )
    check(
        config.get("format_version", 0) <= FORMAT_VERSION,
        f"{path!r} was written by a newer "
        f"meanflow (format {config.get('format_version')}); upgrade meanflow to load it",
    )
    weights_file = os.path.join(path, WEIGHTS_NAME)
    mismatch = f"{weights_file!r} does not match the network of its config"
    try:
        state = load_file(weights_file)
    except OSError as exc:
        raise MeanFlowError(f"{mismatch} ({str(exc).splitlines()[0][:200]})") from None
    norm = config["normalizer"]
    return assemble_run(
        TrainConfig.from_dict(config["train_config"]),
        tuple(config["shape"]),
        state,
        Normalizer(
            torch.tensor(norm["mean"], dtype=torch.float32),
            torch.tensor(norm["std"], dtype=torch.float32),
        ),
        int(config["step"]),
        config["weights"],
        class_names=config.get("class_names"),
        latents=config.get("latents"),
        device=device,
        vae=vae,
        mismatch=mismatch,
    )


def _hub_folder(repo_id: str, local_files_only: bool, revision: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MeanFlowError(
            f"{repo_id!r} is not a local folder, and loading from the Hub needs "
            "huggingface_hub: pip install 'meanflow[hub]'"
        ) from None
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=local_files_only,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"],
        )
    except Exception as exc:  # noqa: BLE001 - the Hub's errors are many; one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MeanFlowError(
            f"{repo_id!r} is neither a local folder nor a Hub model that could "
            f"be fetched ({first[:200]})"
        ) from None


def push_to_hub(
    run: TrainedRun,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload MeanFlow model",
) -> str:
    """Export ``run`` and upload it to the Hub repository ``repo_id`` (created if missing) with
    ``huggingface_hub``; returns the commit URL. Needs network access and a token."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MeanFlowError(
            "push_to_hub needs huggingface_hub: pip install 'meanflow[hub]'"
        ) from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(run, os.path.join(tmp, "model"), name=repo_id)
        return str(
            api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        )
