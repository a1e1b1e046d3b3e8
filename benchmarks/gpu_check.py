"""One-GPU check of MeanFlow on DiT-B/2: JVP correctness, bf16 training, step time, sampling.

    bash benchmarks/gpu_check.sh                      # on a machine with one H100 / H200
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/check.json   # smoke, < 1 min

Five sections, each written to the JSON as soon as it is done (``--out``, default
``benchmarks/results/gpu/<card name>.json``):

(a) ``jvp``: on DiT-B/2 in float64 (batch 4, latents 4x32x32, 1000 classes; the zero-initialised
    adaLN and output layers are filled with N(0, 0.02) so that the derivative is not zero),
    ``du/dt`` from :func:`meanflow.flow.jvp.total_derivative` against a central finite difference along
    the tangent ``(v, 0, 1)``, in float64: relative error ``||jvp - fd|| / ||fd||`` (pass below
    ``--jvp-tol``, 1e-6). Then the same JVP with the network in float32 (TF32 off; on CUDA also
    with TF32 on) and under bf16 autocast (``autocast=True``), each against the float64 JVP.
(b) ``train``: DiT-B/2 trained ``--steps`` (200) steps on random latents and labels with
    :class:`meanflow.objectives.guidance.GuidedMeanFlow` in the paper's ImageNet B/2 settings (25% r != t,
    t, r ~ logit-normal(-0.4, 1), p = 1, omega 1, kappa 0.5, 10% label dropout; Adam lr 1e-4,
    betas (0.9, 0.95), fused on CUDA), the network under bf16 autocast and the JVP in fp32 (the
    library default). Fails on any NaN / Inf loss. Batch 256, or the largest of 256 / 128 / 64
    for which a step with half the rows r != t fits in memory.
(c) ``step_time``: the same network and batch, one step (objective + backward + Adam) for
    guided flow matching, MeanFlow (fp32 JVP) and MeanFlow with the JVP under bf16 autocast
    (``jvp_dtype="autocast"``), interleaved in rounds after a warm-up; median time of the timed
    steps (each between ``torch.cuda.synchronize()``), images/s, ratio to flow matching, and peak
    memory of one step (``torch.cuda.max_memory_allocated``; model, gradients and Adam state
    included, identical for all three).
(d) ``sampling``: one-step sampling (:func:`meanflow.sample`, batch 256, bf16 autocast, no_grad)
    against the bare network forward on the same batch: images/s of each and their ratio.
(e) ``fused_attention`` (run first): the fused attention JVP of
    jvp-flash-attention (extra ``gpu``; :mod:`meanflow.nn.attention` picks it on CUDA) against
    PyTorch's math kernel and the chunked rule: float32 errors against the float64 math kernel
    (output, tangent, gradients), time and peak memory of forward+JVP(+backward) at N = 256, 1024,
    4096 (benchmarks/fused_attention.py). Without CUDA or without the package it is skipped, and
    the reason is printed and recorded; an exception is recorded too. (a)-(d) then use the fused
    kernel (as the library does on CUDA) only if it ran and all its errors are below
    ``FUSED_TOL``, otherwise the chunked rule (``used_in_other_sections``).

Precision setting as the trainer's defaults on CUDA: TF32 matrix products allowed (except in (a)).
Exit code 0 when (a) passes and (b) stays finite, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import interleaved_times, maybe, md_table, sync  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel

from fused_attention import check_fused_attention  # noqa: E402
from fused_attention import table as fused_table  # noqa: E402

from meanflow import TimeSampler, sample
from meanflow.flow.jvp import total_derivative
from meanflow.nn.attention import attention_jvp_backend
from meanflow.nn.dit import dit
from meanflow.objectives.guidance import GuidedFlowMatching, GuidedMeanFlow

CLASSES = 1000
FUSED_TOL = 1e-2  # the fused kernel's largest float32 error (vs float64) to use it in (a)-(d)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine() or "cpu"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def build(args, device, dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return dit(args.size, input_size=args.input_size, in_channels=4,
               num_classes=CLASSES).to(device=device, dtype=dtype)


def randomize_zero_init(model: torch.nn.Module, seed: int = 1, std: float = 0.02) -> None:
    """Fill every all-zero parameter (adaLN-Zero modulations, output layer, biases) with N(0, std),
    so the network is a non-trivial function of (z, r, t)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# -- (a) JVP correctness ----------------------------------------------------------------------
def check_jvp(args, device) -> dict:
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = build(args, device, torch.float64)
        randomize_zero_init(model)
        model.eval()
        gen = torch.Generator().manual_seed(2)
        b, shape = 4, (4, args.input_size, args.input_size)
        z = torch.randn(b, *shape, generator=gen, dtype=torch.float64).to(device)
        v = torch.randn(b, *shape, generator=gen, dtype=torch.float64).to(device)
        r = (0.4 * torch.rand(b, generator=gen, dtype=torch.float64)).to(device)
        t = (r + 0.1 + 0.4 * torch.rand(b, generator=gen, dtype=torch.float64).to(device))
        y = torch.randint(0, CLASSES, (b,), generator=gen).to(device)
        u64, d64 = total_derivative(model, z, r, t, v, y)
        eps = args.fd_eps
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            plus = model(z + eps * v, r, t + eps, y=y)
            minus = model(z - eps * v, r, t - eps, y=y)
        fd = (plus - minus) / (2 * eps)
        out = {"model": f"DiT-{args.size}", "batch": b, "dtype": "float64", "fd_eps": eps,
               "dudt_norm": float(d64.norm()), "u_norm": float(u64.detach().norm()),
               "fp64_vs_fd_rel_err": rel(d64, fd), "threshold": args.jvp_tol}
        out["fp64_pass"] = out["fp64_vs_fd_rel_err"] < args.jvp_tol
        model32 = model.float()
        f32 = lambda a: a.float() if a.is_floating_point() else a  # noqa: E731
        _, d32 = total_derivative(model32, f32(z), f32(r), f32(t), f32(v), y)
        out["fp32_vs_fp64_rel_err"] = rel(d32, d64)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            _, d32t = total_derivative(model32, f32(z), f32(r), f32(t), f32(v), y)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            out["fp32_tf32_vs_fp64_rel_err"] = rel(d32t, d64)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, d16 = total_derivative(model32, f32(z), f32(r), f32(t), f32(v), y, autocast=True)
        out["bf16_autocast_vs_fp64_rel_err"] = rel(d16, d64)
        del model, model32
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow


# -- shared pieces of (b) and (c) ---------------------------------------------------------------
def objectives(ratio: float = 0.25) -> dict:
    """The paper's ImageNet B/2 settings (GuidedMeanFlow), and guided flow matching."""
    times = TimeSampler(mean=-0.4, std=1.0, ratio=ratio)
    kw = dict(omega=1.0, kappa=0.5, label_dropout=0.1, p=1.0)
    return {"flow matching": GuidedFlowMatching(CLASSES, times, **kw),
            "MeanFlow (fp32 JVP)": GuidedMeanFlow(CLASSES, times, **kw),
            "MeanFlow (bf16 JVP)": GuidedMeanFlow(CLASSES, times, jvp_dtype="autocast", **kw)}


def optimizer(model, device):
    return torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                            fused=True if device.type == "cuda" else None)


def make_step(objective, model, opt, device, batch, size, gen):
    """One minimal training step on fresh random latents: objective under bf16 autocast,
    zero_grad, backward, Adam step. Returns (loss, mean err) as 0-d tensors (no host sync)."""
    def step():
        x = torch.randn(batch, 4, size, size, device=device, generator=gen)
        y = torch.randint(0, CLASSES, (batch,), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = objective(model, x, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.loss.detach(), out.err.mean()
    return step


def choose_batch(args, device, model, opt) -> int:
    """The largest of ``args.batches`` for which a MeanFlow step with half the rows r != t (the
    runs draw 25%; more than 40% of 64 or more rows is a 5-sigma event) fits in memory."""
    if device.type != "cuda":
        return args.batches[0]
    probe = objectives(ratio=0.5)["MeanFlow (fp32 JVP)"]
    gen = torch.Generator(device).manual_seed(0)
    for batch in args.batches:
        try:
            make_step(probe, model, opt, device, batch, args.input_size, gen)()
            sync(device)
            return batch
        except torch.cuda.OutOfMemoryError:
            pass
        opt.zero_grad(set_to_none=True)  # outside the except block: its traceback is freed
        gc.collect()
        torch.cuda.empty_cache()
    raise SystemExit(f"even batch {args.batches[-1]} does not fit on {card_name(device)}")


# -- (b) training -------------------------------------------------------------------------------
def check_training(args, device, model, opt, batch) -> dict:
    objective = objectives()["MeanFlow (fp32 JVP)"]
    step = make_step(objective, model, opt, device, batch, args.input_size,
                     torch.Generator(device).manual_seed(1))
    sync(device)
    start = time.perf_counter()
    losses, errs = [], []
    for _ in range(args.steps):
        loss, err = step()
        losses.append(loss)
        errs.append(err)
    sync(device)
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu()
    errs = torch.stack(errs).float().cpu()
    k = max(1, min(10, args.steps // 4))
    finite = bool(torch.isfinite(losses).all() and torch.isfinite(errs).all())
    return {"objective": "GuidedMeanFlow (ratio 0.25, LN(-0.4, 1), p 1, omega 1, kappa 0.5)",
            "precision": "bf16 autocast, JVP fp32", "batch": batch, "steps": args.steps,
            "loss_first": float(losses[0]), "loss_start": float(losses[:k].mean()),
            "loss_end": float(losses[-k:].mean()), "mse_start": float(errs[:k].mean()),
            "mse_end": float(errs[-k:].mean()), "window": k, "finite": finite,
            "nan_steps": int((~torch.isfinite(losses)).sum()), "seconds": seconds,
            "images_per_s": batch * args.steps / seconds}


# -- (c) step time and memory ---------------------------------------------------------------------
def check_step_time(args, device, model, opt, batch) -> dict:
    steps = {name: make_step(obj, model, opt, device, batch, args.input_size,
                             torch.Generator(device).manual_seed(3 + i))
             for i, (name, obj) in enumerate(objectives().items())}
    peaks = {}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync(device)
            peaks[name] = (torch.cuda.max_memory_allocated(device) / 2**20, base / 2**20)
    times = interleaved_times(steps, device, args.rounds, args.steps_per_round)
    fm = statistics.median(times["flow matching"])
    rows = []
    for name, values in times.items():
        med = statistics.median(values)
        row = {"objective": name, "ms_per_step": med * 1e3, "images_per_s": batch / med,
               "ratio_to_flow_matching": med / fm, "timed_steps": len(values)}
        if name in peaks:
            row["peak_mib"], row["resident_before_step_mib"] = peaks[name]
        rows.append(row)
    fm_peak = peaks.get("flow matching", (None,))[0]
    for row in rows:
        if fm_peak:
            row["peak_ratio_to_flow_matching"] = row["peak_mib"] / fm_peak
    return {"batch": batch, "warmup": args.warmup, "rounds": args.rounds,
            "steps_per_round": args.steps_per_round, "rows": rows}


# -- (d) one-step sampling ---------------------------------------------------------------------
def check_sampling(args, device, model) -> dict:
    model.eval()
    batch = args.sample_batch
    gen = torch.Generator(device).manual_seed(4)
    noise = torch.randn(batch, 4, args.input_size, args.input_size, device=device, generator=gen)
    y = torch.randint(0, CLASSES, (batch,), device=device, generator=gen)
    r, t = torch.zeros(batch, device=device), torch.ones(batch, device=device)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return sample(model, noise, steps=1, y=y)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model(noise, r, t, y=y)

    fns = {"one-step sample": one_step, "network forward": forward}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times = interleaved_times(fns, device, args.rounds, args.steps_per_round)
    med = {name: statistics.median(v) for name, v in times.items()}
    finite = bool(torch.isfinite(one_step()).all())
    model.train()
    return {"batch": batch, "one_step_images_per_s": batch / med["one-step sample"],
            "forward_images_per_s": batch / med["network forward"],
            "ms_one_step": med["one-step sample"] * 1e3,
            "ms_forward": med["network forward"] * 1e3,
            "ratio_sample_to_forward": med["one-step sample"] / med["network forward"],
            "samples_finite": finite}


# -- report ----------------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = [f"{res['device_name']} | torch {res['torch']} | DiT-{res['settings']['size']} "
             f"{'(tiny)' if res['tiny'] else ''}"]
    j = res.get("jvp")
    if j:
        checks = [(f"fp64 JVP vs central FD (eps {j['fd_eps']:g})", "fp64_vs_fd_rel_err",
                   f"{'yes' if j['fp64_pass'] else 'NO'} (< {j['threshold']:g})"),
                  ("fp32 JVP vs fp64 JVP", "fp32_vs_fp64_rel_err", ""),
                  ("fp32 JVP with TF32 vs fp64 JVP", "fp32_tf32_vs_fp64_rel_err", ""),
                  ("bf16-autocast JVP vs fp64 JVP", "bf16_autocast_vs_fp64_rel_err", "")]
        lines += [""] + md_table(["JVP check (float64 network)", "relative error", "pass"],
                                 [[label, f"{j[key]:.2e}", verdict]
                                  for label, key, verdict in checks if key in j])
    tr = res.get("train")
    if tr:
        lines += ["", f"training: batch {tr['batch']}, {tr['steps']} steps, bf16 + fp32 JVP: loss "
                  f"{tr['loss_start']:.6f} -> {tr['loss_end']:.6f}, mse {tr['mse_start']:.1f} -> "
                  f"{tr['mse_end']:.1f} (means of {tr['window']} steps), "
                  f"{'finite' if tr['finite'] else 'NaN/Inf: FAIL'}, {tr['seconds']:.0f} s"]
    st = res.get("step_time")
    if st:
        lines += [""] + md_table(
            [f"step (batch {st['batch']}, bf16 autocast)", "ms/step", "images/s", "ratio",
             "peak MiB", "peak ratio"],
            [[row["objective"], f"{row['ms_per_step']:.1f}", f"{row['images_per_s']:.0f}",
              f"{row['ratio_to_flow_matching']:.2f}x", maybe(row.get("peak_mib")),
              maybe(row.get("peak_ratio_to_flow_matching"), ".2f", "x")] for row in st["rows"]])
    sa = res.get("sampling")
    if sa:
        lines += ["", f"sampling (batch {sa['batch']}, bf16): one step "
                  f"{sa['one_step_images_per_s']:.0f} "
                  f"images/s, bare forward {sa['forward_images_per_s']:.0f} images/s, ratio "
                  f"{sa['ratio_sample_to_forward']:.2f}x"]
    fa = res.get("fused_attention")
    if fa:
        lines += [""] + (fused_table(fa) if "error" not in fa
                         else [f"fused attention JVP: FAILED ({fa['error']})"])
        lines.append(f"fused kernel used in the other sections: {fa['used_in_other_sections']}")
    verdict = "PASS" if res.get("pass") else "FAIL"
    lines.append(f"\noverall: {verdict} ({res.get('seconds', 0):.0f} s)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true",
                    help="DiT-T/4 on 4x8x8, batch 8, 10 steps: a CPU smoke test (< 1 min)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/gpu/<card name>.json)")
    ap.add_argument("--size", default=None, help="DiT SIZE/PATCH (default B/2; tiny T/4)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of (b) (200)")
    ap.add_argument("--jvp-tol", type=float, default=1e-6)
    ap.add_argument("--fd-eps", type=float, default=1e-5)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is available (use --tiny --device cpu for "
                         "the CPU smoke test)")
    tiny = args.tiny
    args.size = args.size or ("T/4" if tiny else "B/2")
    args.input_size = 8 if tiny else 32
    args.steps = args.steps or (10 if tiny else 200)
    args.batches = [8] if tiny else [256, 128, 64]
    args.sample_batch = 8 if tiny else 256
    args.warmup, args.rounds, args.steps_per_round = (1, 1, 2) if tiny else (5, 5, 6)
    name = card_name(device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu",
                                   safe_name(name) + ".json")
    res = {"device_name": name, "device": str(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "tiny": tiny, "date": time.strftime("%Y-%m-%d"),
           "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if device.type == "cpu":
        res["threads"] = torch.get_num_threads()

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    start = time.perf_counter()
    stack = contextlib.ExitStack()
    try:
        fused = check_fused_attention(device, (64,) if tiny else (256, 1024, 4096),
                                      64 if tiny else 1024, 3 if tiny else 10)
    except Exception as exc:  # recorded, and the other sections run with the chunked rule
        fused = {"error": f"{type(exc).__name__}: {exc}"}
    errors = fused.get("numbers", {}).get("rel_err_vs_fp64_math", {}).get("fused", {})
    fused["used_in_other_sections"] = bool(errors) and max(errors.values()) < FUSED_TOL
    res["fused_attention"] = fused
    if "skipped" in fused:
        print(f"(e) fused attention JVP: skipped ({fused['skipped']})", flush=True)
    save()
    if not fused["used_in_other_sections"]:
        stack.enter_context(attention_jvp_backend("chunked"))
    res["jvp"] = check_jvp(args, device)
    save()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = build(args, device)
    opt = optimizer(model, device)
    batch = choose_batch(args, device, model, opt)
    model = build(args, device)  # a fresh network (and optimizer) for the training run
    opt = optimizer(model, device)
    res["train"] = check_training(args, device, model, opt, batch)
    save()
    res["step_time"] = check_step_time(args, device, model, opt, batch)
    save()
    del opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["sampling"] = check_sampling(args, device, model)
    res["seconds"] = time.perf_counter() - start
    res["pass"] = bool(res["jvp"]["fp64_pass"] and res["train"]["finite"]
                       and res["sampling"]["samples_finite"])
    save()
    print(table(res))
    print(f"\nwrote {out}")
    sys.exit(0 if res["pass"] else 1)


if __name__ == "__main__":
    main()
