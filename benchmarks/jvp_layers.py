"""Cost of the JVP with meanflow's lean forward-mode layers against torch.nn's own rules.

    python benchmarks/jvp_layers.py --out benchmarks/results/jvp_layers
    python benchmarks/jvp_layers.py --networks unet --rounds 5 --threads 1

For each network of ``benchmarks/train_step.py`` (same sizes and batches), the same model with
its lean rules (:mod:`meanflow.nn.forward_mode`, the default) and under
``forward_mode.torch_rules()`` (torch.nn's layers and PyTorch's forward-mode formulas; attention
keeps its own rule, as no PyTorch formula exists for SDPA's fast kernels). Timed interleaved in
one process, after a warm-up, on the same inputs (half the batch, as the r != t rows of a step
at 50%):

* ``forward``: a no-grad forward; ``forward, graph``: with autograd graph;
* ``jvp <backend>``: ``total_derivative`` (the objective's du/dt), no grad;
* ``jvp <backend>, graph``: the same with the primal's autograd graph kept (as in a step).

Reported: each as a multiple of the same setting's no-grad forward, median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import interleaved_times, md_table, save_results  # noqa: E402
from train_step import build  # noqa: E402

from meanflow.flow.jvp import total_derivative
from meanflow.nn import forward_mode


def calls_for(model, z, r, t, v, y, backends, rules):
    """name -> function, each run under ``rules()`` (a context manager)."""
    def forward():
        with rules(), torch.no_grad():
            model(z, r, t, y=y)

    def forward_graph():
        with rules():
            model(z, r, t, y=y)

    calls = {"forward": forward, "forward, graph": forward_graph}
    for backend in backends:
        def jvp(backend=backend):
            with rules(), torch.no_grad():
                total_derivative(model, z, r, t, v, y, backend=backend)

        def jvp_graph(backend=backend):
            with rules():
                total_derivative(model, z, r, t, v, y, backend=backend)

        calls[f"jvp {backend}"] = jvp
        calls[f"jvp {backend}, graph"] = jvp_graph
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--networks", default="mlp,unet,dit")
    ap.add_argument("--backends", default="forward-ad,func")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    ap.add_argument("--mlp-hidden", type=int, default=1024)
    ap.add_argument("--mlp-batch", type=int, default=512)
    ap.add_argument("--dit-size", default=None)
    ap.add_argument("--dit-res", type=int, default=None)
    ap.add_argument("--dit-batch", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = args.backends.split(",")
    lines = [f"Device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}; median of {args.rounds} rounds. "
             "Cells: time as a multiple of the same setting's no-grad forward (ms of that "
             "forward in the header).", ""]
    result = {"device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "networks": {}}
    for network in args.networks.split(","):
        model, x, y, desc = build(network, device, args)
        h = max(1, x.shape[0] // 2)
        gen = torch.Generator().manual_seed(3)
        z, v = (torch.randn(x[:h].shape, generator=gen).to(device) for _ in range(2))
        t = torch.rand(h, generator=gen).to(device)
        r = t * torch.rand(h, generator=gen).to(device)
        yh = None if y is None else y[:h]
        copies = {"lean": contextlib.nullcontext, "torch.nn": forward_mode.torch_rules}
        calls = {f"{name}: {k}": fn for name, rules in copies.items()
                 for k, fn in calls_for(model, z, r, t, v, yh, backends, rules).items()}
        interleaved_times(calls, device, args.warmup)
        times = interleaved_times(calls, device, args.rounds, rotate=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        kinds = list(calls_for(model, z, r, t, v, yh, backends, contextlib.nullcontext))
        rows = []
        for kind in kinds[1:]:
            rows.append([kind] + [f"{med[f'{c}: {kind}'] / med[f'{c}: forward']:.2f}x"
                                  for c in copies])
        head = [f"{c} (forward {med[f'{c}: forward'] * 1e3:.1f} ms)" for c in copies]
        lines += [f"**{desc}**, JVP on {h} rows", "", *md_table(["", *head], rows), ""]
        result["networks"][network] = {"description": desc, "rows": h,
                                       "median_s": med}
    table = "\n".join(lines)
    print(table)
    save_results(args.out, result, table)


if __name__ == "__main__":
    main()
