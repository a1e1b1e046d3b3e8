"""Tutorial 2: a class-conditional image model, trained, sampled in one step, exported and run
as a diffusers pipeline; about 7 minutes on 2 CPU cores.

    python examples/images.py --out tutorial-images     # --tiny: a few steps (the CI runs it so)

It trains the small U-Net of the ``digits-small`` preset on scikit-learn's 8x8 digits (shown at
16x16), with classifier-free guidance folded into training, so one network evaluation gives a
guided sample. Writes into OUT: ``run/`` (the training run), ``grid-1step.png`` and
``grid-2steps.png`` (one class per column), ``exported/`` (config.json + model.safetensors) and,
when diffusers is installed, ``pipeline.png`` from ``MeanFlowPipeline``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import meanflow
from meanflow.plotting import image_grid_png
from meanflow.train import TrainConfig, configure, load_run, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tutorial-images")
    ap.add_argument("--steps", type=int, default=1000, help="training steps")
    ap.add_argument("--tiny", action="store_true", help="3 steps, a narrow U-Net (smoke run)")
    args = ap.parse_args()

    # 1. A configuration: the preset's network, times, guidance and optimizer, and our changes
    #    (any `--set key=value` of `meanflow train`; docs/configuration.md lists them).
    overrides = [("steps", args.steps), ("grid_every", 0)]
    if args.tiny:
        overrides = [("steps", 3), ("batch_size", 8), ("model.channels", 8), ("grid_every", 0)]
    cfg = configure(TrainConfig(), "digits-small", overrides)

    # 2. Training writes a run directory (checkpoints, metrics, pictures); rerunning resumes it.
    run_dir = os.path.join(args.out, "run")
    train(cfg, run_dir, overwrite=True, progress=not args.tiny)

    # 3. Sampling from the EMA weights: one class per column, 1 and 2 network evaluations.
    run = load_run(run_dir)
    for steps in (1, 2):
        images = run.sample(100, steps=steps, seed=0, classes=run.class_names)  # [-1, 1]
        labels = torch.arange(100) % 10
        name = f"grid-{steps}step{'s' if steps > 1 else ''}.png"
        image_grid_png(
            os.path.join(args.out, name),
            images,
            10,
            scale=2,
            class_names=run.class_names,
            labels=labels,
        )

    # 4. Export like the Hub (config.json + model.safetensors) and load it back.
    exported = run.save_pretrained(os.path.join(args.out, "exported"), overwrite=True)
    back = meanflow.from_pretrained(exported)
    same = np.array_equal(run.sample(8, seed=1, classes="7"), back.sample(8, seed=1, classes="7"))
    print(f"exported to {exported}; the same samples after loading: {same}")

    # 5. The same model as a diffusers pipeline (pip install 'meanflow[diffusers]').
    try:
        from meanflow.runs.pipeline import MeanFlowPipeline
    except meanflow.MeanFlowError as exc:
        print(f"skipping the pipeline: {exc}")
        return
    pipe = MeanFlowPipeline.from_run(back)
    out = pipe(
        batch_size=10,
        class_labels=list(range(10)),
        generator=torch.manual_seed(0),
        output_type="np",
    )
    image_grid_png(
        os.path.join(args.out, "pipeline.png"),
        out.images.transpose(0, 3, 1, 2) * 2 - 1,
        10,
        scale=2,
    )
    print(f"wrote {args.out}/grid-1step.png, grid-2steps.png and pipeline.png")


if __name__ == "__main__":
    main()
