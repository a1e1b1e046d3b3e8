"""What ``torch.compile`` does with the MeanFlow JVP on the running PyTorch (CPU or CUDA).

    python benchmarks/compile_jvp.py --out benchmarks/results/compile_jvp/torch-2.15.0
    python benchmarks/compile_jvp.py --networks tiny --rounds 2        # a quick look

The step measured is the MeanFlow loss with every draw fixed (x, e, r, t given):

    z = (1 - t) x + t e,  v = e - x,  (u, du/dt) = JVP of u(z, r, t) along (v, 0, 1),
    loss = mean((u - sg(v - (t - r) du/dt))^2),   then loss.backward()

with ``(u, du/dt)`` from :func:`meanflow.flow.jvp.total_derivative` (the library's JVP, with its
lean layer rules) for ``backend`` "func" (``torch.func.jvp``) and "forward-ad" (dual tensors).
For each network and back-end it records:

* ``compiled_step``: ``torch.compile`` of the whole loss function (the JVP inside the compiled
  region, the backward through the compiled graph): whether forward and backward run, the
  largest relative difference of the loss and of the gradients from eager, the graph breaks
  dynamo reported, the seconds of the first (compiling) call, and the median seconds per step
  of eager and compiled steps timed interleaved in ``--rounds`` rounds, and their ratio.
* ``compiled_module``: the JVP of ``torch.compile(model)`` called from eager code (what a bare
  ``compile=true`` did before ``CompiledForward``): whether the tangent comes back (forward-ad)
  or dynamo reports the functorch call as unsupported (func, pytorch/pytorch#128711), and the
  relative difference of ``du/dt`` from eager.

Relative differences are ``max|a - b| / max|b|`` per tensor (the largest over tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import interleaved_times, md_table, save_results  # noqa: E402

from meanflow.flow.jvp import total_derivative  # noqa: E402

BACKENDS = ("func", "forward-ad", "bare-func")


def build(network: str, device: torch.device):
    """``(model, x, description)``: the networks of benchmarks/train_step.py (CPU sizes)."""
    from meanflow.config.build import build_model
    from meanflow.config.presets import configure
    from meanflow.train import TrainConfig

    torch.manual_seed(0)
    if network == "mlp":
        cfg = configure(TrainConfig(), "mlp", [("model.hidden", 1024), ("model.depth", 4)])
        shape, batch, desc = (2,), 512, "MLP 2-1024x4, batch 512"
    elif network == "dit":
        cfg = configure(TrainConfig(), None, [("model.arch", "dit"), ("model.size", "T/2")])
        shape, batch, desc = (4, 16, 16), 32, "DiT-T/2 on 4x16x16, batch 32"
    elif network in ("plain-mlp", "plain-tiny"):
        from train_step import PlainMLP

        hidden, depth, batch = (1024, 4, 512) if network == "plain-mlp" else (32, 2, 64)
        model = PlainMLP(2, hidden, depth).to(device)
        x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(1)).to(device)
        return model, x, f"torch.nn MLP 64-{hidden}x{depth} ({network}), batch {batch}"
    elif network == "tiny":
        cfg = configure(TrainConfig(), "tiny")
        shape, batch, desc = (2,), 64, "MLP 2-32x2 (tiny), batch 64"
    else:
        raise SystemExit(f"unknown network {network!r}; use mlp, dit, tiny, plain-mlp, plain-tiny")
    model = build_model(cfg, shape).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    return model, x, desc


def draws(x: torch.Tensor):
    """Fixed noise and times, 75% of the rows with r != t."""
    gen = torch.Generator().manual_seed(2)
    n = x.shape[0]
    e = torch.randn(x.shape, generator=gen).to(x.device)
    t = torch.rand(n, generator=gen).to(x.device)
    r = t * torch.rand(n, generator=gen).to(x.device)
    r = torch.where(torch.arange(n, device=x.device) % 4 == 0, t, r)
    return e, r, t


def meanflow_loss(model, x, e, r, t, backend: str) -> torch.Tensor:
    """The MeanFlow loss of the module docstring (p = 0: plain squared error)."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    z, v = (1 - tt) * x + tt * e, e - x
    u, dudt = jvp(model, z, r, t, v, backend)
    target = (v - (tt - r.view_as(tt)) * dudt).detach()
    return (u - target).pow(2).mean()


def jvp(model, z, r, t, v, backend: str):
    """``(u, du/dt)``: the library's ``total_derivative``, or for "bare-func" a bare
    ``torch.func.jvp`` of the network (none of the library's contexts or casts)."""
    if backend == "bare-func":
        u, dudt = torch.func.jvp(
            lambda z_, r_, t_: model(z_, r_, t_),
            (z, r, t),
            (v, torch.zeros_like(r), torch.ones_like(t)),
        )
        return u, dudt.detach()
    return total_derivative(model, z, r, t, v, backend=backend)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads_of(model, loss_fn) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss), [p.grad.detach().clone() for p in model.parameters()]


def counters_snapshot() -> dict:
    from torch._dynamo.utils import counters

    return {
        "frames_ok": int(counters["frames"]["ok"]),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": {k[:400]: int(n) for k, n in counters["graph_break"].items()},
        "unimplemented": {k[:400]: int(n) for k, n in counters["unimplemented"].items()},
    }


def compiled_step(model, x, backend: str, rounds: int) -> dict:
    """The whole loss (JVP included) under torch.compile, against eager."""
    from torch._dynamo.utils import counters

    e, r, t = draws(x)
    eager_fn = lambda: meanflow_loss(model, x, e, r, t, backend)  # noqa: E731
    loss_e, grads_e = grads_of(model, eager_fn)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(meanflow_loss)
    comp_fn = lambda: compiled(model, x, e, r, t, backend)  # noqa: E731
    res: dict = {}
    start = time.perf_counter()
    try:
        loss_c, grads_c = grads_of(model, comp_fn)
    except Exception as err:  # noqa: BLE001  (what fails is the finding)
        res.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        res.update(counters_snapshot())
        torch._dynamo.reset()
        return res
    res["first_call_s"] = time.perf_counter() - start
    res.update(
        ok=True,
        loss_rel=abs(loss_c - loss_e) / abs(loss_e),
        grad_rel=max(rel(a, b) for a, b in zip(grads_c, grads_e)),
    )
    res.update(counters_snapshot())

    def step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            fn().backward()

        return run

    calls = {"eager": step(eager_fn), "compiled": step(comp_fn)}
    for fn in calls.values():  # warm-up (a recompile, if any, happens here)
        fn()
    times = interleaved_times(calls, x.device, rounds, repeats=2, rotate=True)
    res["eager_ms"] = 1e3 * statistics.median(times["eager"])
    res["compiled_ms"] = 1e3 * statistics.median(times["compiled"])
    res["ratio"] = res["compiled_ms"] / res["eager_ms"]
    res["recompiles_after_first"] = counters_snapshot()["frames_ok"] - res["frames_ok"]
    torch._dynamo.reset()
    return res


def compiled_module(model, x, backend: str) -> dict:
    """The JVP of torch.compile(model) called from eager code."""
    from torch._dynamo.utils import counters

    e, r, t = draws(x)
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    z, v = (1 - tt) * x + tt * e, e - x
    _, d_e = jvp(model, z, r, t, v, backend)
    torch._dynamo.reset()
    counters.clear()
    res: dict = {}
    try:
        _, d_c = jvp(torch.compile(model), z, r, t, v, backend)
        res.update(ok=True, dudt_rel=rel(d_c, d_e))
    except Exception as err:  # noqa: BLE001
        res.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    snap = counters_snapshot()
    res["functorch_unsupported"] = sum(
        n for k, n in snap["unimplemented"].items() if "functorch" in k or "func" in k
    )
    res.update(snap)
    torch._dynamo.reset()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--networks", default="mlp", help="mlp,dit,tiny,plain-mlp,plain-tiny")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--out", default=None, help="folder for results.json and table.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "rounds": args.rounds,
        "load_before": list(os.getloadavg()),
        "networks": {},
    }
    rows = []
    for network in args.networks.split(","):
        model, x, desc = build(network, device)
        entry = {"description": desc}
        for backend in args.backends.split(","):
            mod = compiled_module(model, x, backend)
            print(f"{network} {backend} compiled module: {json.dumps(mod)}", flush=True)
            step = compiled_step(model, x, backend, args.rounds)
            print(f"{network} {backend} compiled step: {json.dumps(step)}", flush=True)
            entry[backend] = {"compiled_step": step, "compiled_module": mod}
            breaks = sum(step.get("graph_breaks", {}).values())
            rows.append(
                [
                    desc,
                    backend,
                    "yes" if step["ok"] else f"no: {step['error'][:80]}",
                    f"{step['loss_rel']:.1e} / {step['grad_rel']:.1e}" if step["ok"] else "-",
                    str(breaks),
                    f"{step['first_call_s']:.0f}" if step["ok"] else "-",
                    f"{step['eager_ms']:.1f} / {step['compiled_ms']:.1f} ({step['ratio']:.2f}x)"
                    if step["ok"]
                    else "-",
                    (
                        f"tangent, rel {mod['dudt_rel']:.1e}"
                        if mod["ok"]
                        else f"no: {mod['error'][:60]}"
                    )
                    + (
                        f"; {mod['functorch_unsupported']} unsupported functorch call(s)"
                        if mod["functorch_unsupported"]
                        else ""
                    ),
                ]
            )
        result["networks"][network] = entry
    result["load_after"] = list(os.getloadavg())
    table = "\n".join(
        [
            f"torch {result['torch']}, device {args.device}, {result['threads']} thread(s), "
            f"{args.rounds} rounds x 2 steps; load average before {result['load_before']}, "
            f"after {result['load_after']}.",
            "",
            *md_table(
                [
                    "network",
                    "JVP back-end",
                    "compiled step runs (fwd+bwd)",
                    "rel. diff loss / grads",
                    "graph breaks",
                    "first call s",
                    "ms/step eager / compiled",
                    "JVP of torch.compile(model) from eager",
                ],
                rows,
            ),
        ]
    )
    print(table)
    save_results(args.out, result, table)


if __name__ == "__main__":
    main()
