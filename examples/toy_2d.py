"""Tutorial 1: MeanFlow on 2-D points, from Python, in a few minutes on a laptop CPU.

    python examples/toy_2d.py --out tutorial-2d      # --tiny: a few steps (the CI runs it so)

It trains the MLP on the checkerboard with the MeanFlow objective, in our conventions (t = 0
data, t = 1 noise; the network predicts the average velocity u(z, r, t)), then samples in one
and in two network evaluations and compares both with the data by the sliced Wasserstein
distance (SWD). Writes ``OUT/samples.png`` (data, 1 step, 2 steps) and ``OUT/swd.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from meanflow import MeanFlow, TimeSampler, sample
from meanflow.data import load_vectors
from meanflow.eval import sliced_wasserstein
from meanflow.nn import MLP
from meanflow.plotting import scatter_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tutorial-2d")
    ap.add_argument("--steps", type=int, default=5000, help="training steps")
    ap.add_argument("--tiny", action="store_true", help="20 steps, a narrow network (smoke run)")
    args = ap.parse_args()
    steps, hidden = (20, 32) if args.tiny else (args.steps, 256)
    torch.manual_seed(0)

    # 1. Data: (N, 2) float32 points. Any (N, D) tensor works the same way.
    data = torch.from_numpy(load_vectors("checkerboard", num=20_000))

    # 2. The network u(z, r, t) and the objective. TimeSampler draws (r, t): logit-normal times,
    #    ordered so that r <= t; `ratio` of the rows get r != t, the others r = t (plain flow
    #    matching); `mix` of the rows draw both times uniformly instead, so the intervals a
    #    2- or 4-step sampler uses are trained too. These are the toy-2d preset's choices
    #    (docs/onestep.md): the authors' improved CIFAR-10 times, 75% uniform draws, a share of
    #    r != t rows growing from 25% to 75% over the run (the velocity is learned first), the
    #    network seeing (t, r), and the plain squared error (p = 0).
    model = MLP(dim=2, hidden=hidden, depth=4, time_input="t,r")
    times = TimeSampler(
        mean=-0.6, std=1.6, r_mean=-4.0, r_std=1.6, ratio=0.75, mix=0.75, ratio_start=0.25
    )
    objective = MeanFlow(times, p=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    # 3. Training: the objective builds the target u_tgt = sg(v - (t - r) du/dt) with one JVP
    #    along (v, 0, 1) and returns the (adaptively weighted) loss.
    for step in range(steps):
        objective.at_step(step, steps)  # the r != t share of this step
        x = data[torch.randint(len(data), (1024,))]
        out = objective(model, x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
        if step % 1000 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.4f}")

    # 4. Sampling: one step is x = e - u(e, 0, 1); two steps go 1 -> 0.5 -> 0.
    noise = torch.randn(5000, 2, generator=torch.Generator().manual_seed(1))
    one, two = sample(model, noise, steps=1), sample(model, noise, steps=2)
    reference = data[:5000]
    swd = {
        "1 step": sliced_wasserstein(one, reference),
        "2 steps": sliced_wasserstein(two, reference),
        "floor (data vs data)": sliced_wasserstein(data[5000:10000], reference),
    }
    os.makedirs(args.out, exist_ok=True)
    scatter_png(
        os.path.join(args.out, "samples.png"),
        [
            ("data", reference.numpy()),
            (f"1 step, SWD {swd['1 step']:.3f}", one.numpy()),
            (f"2 steps, SWD {swd['2 steps']:.3f}", two.numpy()),
        ],
        lim=4.5,
    )
    with open(os.path.join(args.out, "swd.json"), "w") as f:
        json.dump({"steps": steps, **swd}, f, indent=1)
    print(json.dumps(swd))


if __name__ == "__main__":
    main()
