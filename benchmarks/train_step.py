"""Training-step cost of MeanFlow against flow matching: one harness for every network.

    python benchmarks/train_step.py --out benchmarks/results/train_step          # CPU
    python benchmarks/train_step.py --device cuda --out benchmarks/results/train_step_cuda
    python benchmarks/train_step.py --networks mlp --ratios 0.25 --rounds 3 --no-memory

One step = objective forward (``objective.draw`` + ``objective(model, x, y, **draws)``, as the
training loop calls it) + backward + Adam step. For each network, one model, one Adam optimizer,
one batch and one device serve every row; the rows (flow matching, then MeanFlow at each r != t
ratio for each ``loss.jvp`` mode and, when the library has them, each JVP back-end) run
interleaved in rounds, in a rotated order each round, after a warm-up that is not timed. A row's
ratio to flow matching is the median over rounds of (row time / flow-matching time in the same
round); the spread is the interquartile range of its per-step times over rounds.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the row's steps minus the memory
allocated before them (in this process). On CPU PyTorch keeps no allocator statistics, so each row
runs again in a fresh subprocess (same network, batch, seed): after ``--warmup`` steps the
peak-RSS mark is reset (``/proc/self/clear_refs``), ``--memory-steps`` steps run, and the figure is
the new peak (VmHWM) minus the resident set before them: the transient memory a step adds on top
of weights, Adam state and batch (activations, tangents, gradients). glibc's mmap threshold is
fixed at 64 KiB in that process so freed tensors leave the resident set.

Networks: ``mlp`` = MLP 2-1024x4 at batch 512 (docs/benchmarks.md section 2); ``plain-mlp`` = the
same size built from ``torch.nn`` only (:class:`PlainMLP`: no project layers, so its lean rules
come from the routing of ``meanflow.nn.forward_mode.routing``); ``unet`` = the
``fashion-mnist-small`` preset's U-Net (1x28x28, 10 classes, labels passed, no guidance) at batch
64; ``dit`` = DiT T/2 on 4x16x16 latents at batch 32 on CPU, DiT-B/2 on 4x32x32 at batch 64 on
CUDA (``--dit-size`` / ``--dit-batch`` change them).

``--torch-rules-rows`` adds, for each r != t fraction, a row with the default back-end and
loss.jvp=subset run under ``meanflow.nn.forward_mode.torch_rules()`` (PyTorch's own forward-mode
formulas: for ``plain-mlp`` that is the routing off, for ``mlp`` the project's layers off).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import interleaved_times, maybe, md_row, md_table, save_results, status_mib, sync  # noqa: E402

from meanflow import FlowMatching, MeanFlow, TimeSampler
from meanflow.nn.forward_mode import torch_rules

MODES = ("subset", "full", "detached")


def backends() -> tuple[str, ...]:
    """The JVP back-ends ``MeanFlow`` accepts (``jvp_backend=``), or () when it takes none."""
    if "jvp_backend" not in inspect.signature(MeanFlow.__init__).parameters:
        return ()
    from meanflow.flow import jvp
    return tuple(getattr(jvp, "JVP_BACKENDS", ()))


class PlainMLP(nn.Module):
    """A user-style network of ``torch.nn`` layers only: ``[z, r, t, cos/sin(2^k pi (t, t - r))]``
    (``dim + 2 + 4 * freqs`` inputs; 64 for 2-D data) -> ``depth`` Linear+SiLU layers of width
    ``hidden`` -> Linear to ``dim``; ``model(z, r, t, y=None)``."""

    def __init__(self, dim: int = 2, hidden: int = 1024, depth: int = 4, freqs: int = 15):
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(freqs))
        widths = [dim + 2 + 4 * freqs] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, z, r, t, y=None):
        times = torch.stack([t, t - r], dim=1)[..., None] * self.freqs  # (B, 2, F)
        feats = torch.cat([times.cos(), times.sin()], dim=1).flatten(1)
        return self.net(torch.cat([z, r[:, None], t[:, None], feats], dim=1))


def build(network: str, device: torch.device, args) -> tuple[torch.nn.Module, torch.Tensor,
                                                              torch.Tensor | None, str]:
    """``(model, x, y, description)`` of one network and its batch, seeded."""
    from meanflow.config.build import build_model, count_parameters
    from meanflow.config.presets import configure
    from meanflow.train import TrainConfig

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    y = None
    if network == "mlp":
        cfg = configure(TrainConfig(), "mlp", [("model.hidden", args.mlp_hidden),
                                                ("model.depth", 4)])
        shape, batch, classes = (2,), args.mlp_batch, 0
        desc = f"MLP 2-{args.mlp_hidden}x4, batch {batch}"
    elif network == "plain-mlp":
        model = PlainMLP(2, args.mlp_hidden, 4).to(device)
        x = torch.randn(args.mlp_batch, 2, generator=gen).to(device)
        n = sum(p.numel() for p in model.parameters())
        return model, x, None, (f"plain torch.nn MLP 64-{args.mlp_hidden}x4, batch "
                                f"{args.mlp_batch}, {n / 1e6:.2f}M parameters")
    elif network == "unet":
        cfg = configure(TrainConfig(), "fashion-mnist-small")
        shape, batch, classes = (1, 28, 28), 64, 10
        desc = "U-Net of fashion-mnist-small (1x28x28, 10 classes), batch 64"
    elif network == "dit":
        cuda = device.type == "cuda"
        size = args.dit_size or ("B/2" if cuda else "T/2")
        res = args.dit_res or (32 if cuda else 16)
        batch = args.dit_batch or (64 if cuda else 32)
        cfg = configure(TrainConfig(), None, [("model.arch", "dit"), ("model.size", size)])
        shape, classes = (4, res, res), 0
        desc = f"DiT-{size} on 4x{res}x{res} latents, batch {batch}"
    elif network == "tiny":  # smoke tests
        cfg = configure(TrainConfig(), "tiny")
        shape, batch, classes = (2,), 64, 0
        desc = "MLP 2-32x2 (tiny), batch 64"
    else:
        raise SystemExit(f"unknown network {network!r}; use mlp, plain-mlp, unet, dit, tiny")
    model = build_model(cfg, shape, classes).to(device)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    if classes:
        y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return model, x, y, f"{desc}, {count_parameters(model) / 1e6:.2f}M parameters"


def default_backend() -> str | None:
    param = inspect.signature(MeanFlow.__init__).parameters.get("jvp_backend")
    return None if param is None else param.default


def rows(ratios: list[float], modes, with_backends: bool,
         torch_rules_rows: bool = False) -> list[dict]:
    """The objectives to compare: flow matching first, then MeanFlow variants (the loss.jvp
    modes with the default back-end, then loss.jvp=subset with each other back-end, then, if
    asked, loss.jvp=subset with the default back-end under ``torch_rules()``)."""
    out = [{"name": "flow matching", "objective": "flow-matching"}]
    default = default_backend()
    available = [b for b in backends() if b != default] if with_backends else []
    suffix = f" ({default})" if default else ""
    for ratio in ratios:
        for mode in modes:
            out.append({"name": f"MeanFlow {ratio:.0%}, loss.jvp={mode}{suffix}",
                        "objective": "meanflow", "r_ne_t": ratio, "jvp": mode})
        for backend in available:
            out.append({"name": f"MeanFlow {ratio:.0%}, subset, jvp_backend={backend}",
                        "objective": "meanflow", "r_ne_t": ratio, "jvp": "subset",
                        "jvp_backend": backend})
        if torch_rules_rows:
            out.append({"name": f"MeanFlow {ratio:.0%}, subset{suffix}, torch rules",
                        "objective": "meanflow", "r_ne_t": ratio, "jvp": "subset",
                        "torch_rules": True})
    return out


MIN_MEMORY_MIB = 0.5  # the smallest flow-matching peak growth a memory ratio is divided by


def objective_of(row: dict):
    if row["objective"] == "flow-matching":
        return FlowMatching(TimeSampler())
    kwargs = {"jvp": row["jvp"]}
    if "jvp_backend" in row:
        kwargs["jvp_backend"] = row["jvp_backend"]
    return MeanFlow(TimeSampler(ratio=row["r_ne_t"]), **kwargs)


def make_step(objective, model, opt, x, y, seed: int, rules_off: bool = False):
    gen = torch.Generator(x.device).manual_seed(seed)

    def step():
        draws = objective.draw(x.shape[0], tuple(x.shape[1:]), generator=gen, device=x.device)
        if rules_off:
            with torch_rules():
                out = objective(model, x, y, **draws.kwargs())
        else:
            out = objective(model, x, y, **draws.kwargs())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return step


def memory_worker(network: str, row: dict, args) -> dict:
    """Peak resident memory a training step of one row adds above the steady state, measured in
    this fresh process (CPU): ``--warmup`` steps first (Adam's state, lazy library buffers),
    then the peak-RSS mark is reset (``/proc/self/clear_refs``) and ``--memory-steps`` steps run;
    the figure is the new peak (VmHWM) minus the resident set (VmRSS) before them."""
    device = torch.device("cpu")
    model, x, y, _ = build(network, device, args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = make_step(objective_of(row), model, opt, x, y, seed=0,
                     rules_off=row.get("torch_rules", False))
    for _ in range(max(1, args.warmup)):
        step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mib("VmRSS")
    for _ in range(args.memory_steps):
        step()
    peak = status_mib("VmHWM")
    return {"peak_rss_mib": peak, "rss_before_mib": before, "peak_growth_mib": peak - before}


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def bench_network(network: str, device: torch.device, args) -> dict:
    model, x, y, desc = build(network, device, args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    table = rows(args.ratios, args.modes, not args.no_backends, args.torch_rules_rows)
    steps = [make_step(objective_of(row), model, opt, x, y, seed=i,
                       rules_off=row.get("torch_rules", False)) for i, row in enumerate(table)]
    for step in steps:  # warm-up, not timed
        for _ in range(args.warmup):
            step()
    peaks = [0.0 for _ in table]

    @contextmanager
    def cuda_peak(i: int):  # the peak CUDA memory of row i's steps above what was allocated
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        sync(device)
        peaks[i] = max(peaks[i], (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20)

    times = interleaved_times(dict(enumerate(steps)), device, args.rounds, args.steps_per_round,
                              rotate=True, block=True,
                              probe=cuda_peak if device.type == "cuda" else None)
    results = []
    for i, row in enumerate(table):
        ratios = [a / b for a, b in zip(times[i], times[0])]
        q1, q3 = quartiles(times[i])
        r1, r3 = quartiles(ratios)
        results.append({**row, "ms_median": 1e3 * statistics.median(times[i]),
                        "ms_q1": 1e3 * q1, "ms_q3": 1e3 * q3, "ms_min": 1e3 * min(times[i]),
                        "ms_max": 1e3 * max(times[i]), "ratio": statistics.median(ratios),
                        "ratio_q1": r1, "ratio_q3": r3,
                        "ms_rounds": [1e3 * t for t in times[i]]})
        if device.type == "cuda":
            results[-1]["peak_mib"] = peaks[i]
    if device.type == "cpu" and not args.no_memory:
        from concurrent.futures import ThreadPoolExecutor

        # one fresh process per row, a few at a time (the timing is done; RSS is per process)
        with ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2))) as pool:
            mems = list(pool.map(lambda res: run_memory_worker(network, {
                k: res[k] for k in ("name", "objective", "r_ne_t", "jvp", "jvp_backend", "torch_rules")
                if k in res}, args), results))
        for res, mem in zip(results, mems):
            res.update(mem)
    fm_mem = results[0].get("peak_mib")
    for res in results:
        if res.get("peak_mib") is None:
            continue
        # a ratio to a growth below a page or two is noise, not a measurement: None, said so
        res["memory_ratio"] = (res["peak_mib"] / fm_mem if fm_mem is not None
                               and fm_mem >= MIN_MEMORY_MIB else None)
    return {"network": network, "description": desc, "rows": results}


def run_memory_worker(network: str, row: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", network,
           json.dumps(row), "--threads", str(args.threads), "--memory-steps",
           str(args.memory_steps), "--warmup", str(args.warmup), "--mlp-hidden",
           str(args.mlp_hidden),
           "--mlp-batch", str(args.mlp_batch)]
    for flag, value in (("--dit-size", args.dit_size), ("--dit-res", args.dit_res),
                        ("--dit-batch", args.dit_batch)):
        if value:
            cmd += [flag, str(value)]
    # a fixed mmap threshold: glibc then returns freed tensors to the system at once, so the
    # resident set follows the live tensors (its adaptive threshold would keep them cached)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    mem = json.loads(out.strip().splitlines()[-1])
    return {"peak_mib": mem["peak_growth_mib"], "peak_rss_mib": mem["peak_rss_mib"]}


def markdown(result: dict) -> str:
    s = result["settings"]
    mem_kind = ("peak CUDA memory allocated during the step above what was allocated before it"
                if s["device"].startswith("cuda") else
                "peak RSS a step adds above the steady state, fresh process per row (VmHWM after "
                "clear_refs - VmRSS before)")
    lines = [f"Device {s['device']}, {result['threads']} threads, torch {result['torch']}, "
             f"{s['rounds']} rounds x {s['steps_per_round']} steps after {s['warmup']} warm-up "
             f"steps; load average before: {result['load_before']}, after: "
             f"{result['load_after']}. Memory: {mem_kind}.", ""]
    for net in result["networks"]:
        lines += [f"**{net['description']}**", ""] + md_table(
            ["objective", "ms/step (median)", "IQR ms", "ratio to FM (IQR)", "peak MiB",
             "memory ratio"],
            [[row["name"], f"{row['ms_median']:.2f}", f"{row['ms_q1']:.2f}-{row['ms_q3']:.2f}",
              f"{row['ratio']:.2f} ({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f})",
              maybe(row.get("peak_mib")), maybe(row.get("memory_ratio"), ".2f")]
             for row in net["rows"]]) + [""]
    return "\n".join(lines)


def summary_markdown(result: dict) -> str:
    """One compact table per network: each MeanFlow variant's time ratio to flow matching (and
    peak-memory ratio) at every r != t fraction."""
    lines = []
    for net in result["networks"]:
        fm = net["rows"][0]
        fracs = sorted({row["r_ne_t"] for row in net["rows"][1:]})
        variants = []
        for row in net["rows"][1:]:
            label = row["name"].split(", ", 1)[1]
            if label not in variants:
                variants.append(label)
        mem = fm.get("peak_mib") is not None
        lines += [f"**{net['description']}**: flow matching {fm['ms_median']:.1f} ms/step"
                  + (f", peak {fm['peak_mib']:.0f} MiB" if mem else ""), "",
                  *md_table(["MeanFlow variant"] + [f"{f:.0%} r != t" for f in fracs])]
        for label in variants:
            cells = []
            for f in fracs:
                row = next(r for r in net["rows"][1:]
                           if r["r_ne_t"] == f and r["name"].split(", ", 1)[1] == label)
                cell = f"{row['ratio']:.2f}x"
                if row.get("memory_ratio") is not None:
                    cell += f" (mem {row['memory_ratio']:.2f}x)"
                cells.append(cell)
            lines.append(md_row(label, *cells))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    ap.add_argument("--networks", default="mlp,unet,dit", help="mlp,plain-mlp,unet,dit (tiny: tests)")
    ap.add_argument("--ratios", default="0.25,0.5,0.75", help="fractions of r != t")
    ap.add_argument("--modes", default=",".join(MODES), help="loss.jvp modes")
    ap.add_argument("--no-backends", action="store_true", help="skip jvp_backend rows")
    ap.add_argument("--torch-rules-rows", action="store_true",
                    help="add subset rows under torch_rules() (PyTorch's forward-mode formulas)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--mlp-hidden", type=int, default=1024)
    ap.add_argument("--mlp-batch", type=int, default=512)
    ap.add_argument("--dit-size", default=None)
    ap.add_argument("--dit-res", type=int, default=None)
    ap.add_argument("--dit-batch", type=int, default=None)
    ap.add_argument("--out", help="folder for results.json and table.md")
    ap.add_argument("--render", metavar="JSON", help="only rewrite table.md (to --out) from a "
                    "results.json")
    ap.add_argument("--memory-worker", nargs=2, metavar=("NETWORK", "ROW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker[0], json.loads(args.memory_worker[1]),
                                       args)))
        return
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        table = summary_markdown(result) + "\n" + markdown(result)
        print(table)
        if args.out:
            with open(os.path.join(args.out, "table.md"), "w") as f:
                f.write(table + "\n")
        return
    args.ratios = [float(v) for v in args.ratios.split(",") if v]
    args.modes = [m for m in args.modes.split(",") if m]
    device = torch.device(args.device)
    load_before = os.getloadavg()
    nets = []
    for network in [n for n in args.networks.split(",") if n]:
        net = bench_network(network, device, args)
        nets.append(net)
        print(f"{net['description']}", flush=True)
        for row in net["rows"]:
            print(f"  {row['name']:<48} {row['ms_median']:9.2f} ms  {row['ratio']:.2f}x"
                  + (f"  {row['peak_mib']:.0f} MiB" if row.get("peak_mib") is not None else ""),
                  flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "memory_worker"}
    result = {"settings": settings, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "available_backends": list(backends()), "default_backend": default_backend(),
              "load_before": [round(v, 2) for v in load_before],
              "load_after": [round(v, 2) for v in os.getloadavg()],
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "networks": nets}
    table = summary_markdown(result) + "\n" + markdown(result)
    print(table)
    save_results(args.out, result, table)


if __name__ == "__main__":
    main()
