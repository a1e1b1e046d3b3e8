"""The fused attention JVP (jvp-flash-attention) against PyTorch's math kernel: numbers, time, memory.

    python benchmarks/fused_attention.py            # on CUDA with `pip install meanflow[gpu]`

Section (e) of benchmarks/gpu_check.py. For ``O = softmax(Q K^T / sqrt(D)) V`` with
(B, H, N, D) = (4, 12, N, 64), N in ``--lengths`` (256, 1024, 4096), float32, tangents
``dQ, dK, dV`` and a cotangent ``G``, three ways of computing ``(O, dO)`` with forward-AD dual
tensors and then ``dL/d(Q, K, V)`` of ``L = sum(G * O)`` through the primal (as a MeanFlow step
does):

* ``math``: ``F.scaled_dot_product_attention`` under ``sdpa_kernel(MATH)`` with PyTorch's own
  forward-mode formulas (builds the N x N scores);
* ``chunked``: :func:`meanflow.nn.attention.attention` with the chunked rules;
* ``fused``: the same function with the jvp-flash-attention Triton kernel.

Numbers: at N = ``--check-length`` (1024; B = 2, H = 4), each method's ``O``, ``dO`` and the three
gradients against the math kernel in float64 (relative Frobenius error; the fused kernel's dot
products may run in TF32). Time: median over ``--reps`` of the forward+JVP and of forward+JVP+
backward (between ``torch.cuda.synchronize()``); memory: ``torch.cuda.max_memory_allocated``
during one forward+JVP+backward above what was allocated before. Without CUDA, or without the
package, the section is skipped with its reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.nn import attention as attention_module
from meanflow.nn.attention import attention, attention_jvp_backend
from meanflow.nn.forward_mode import torch_rules

METHODS = ("math", "chunked", "fused")


def _run(method: str, q, k, v, dq, dk, dv, grad=None):
    """``(O, dO)`` by ``method`` with forward-AD; with ``grad``, also ``dL/d(q, k, v)`` of
    ``L = sum(grad * O)``."""
    q, k, v = (a.detach().requires_grad_(grad is not None) for a in (q, k, v))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip((q, k, v), (dq, dk, dv))]
        if method == "math":
            with torch_rules(), sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(*duals)
        else:
            with attention_jvp_backend(method):
                out = attention(*duals)
        o, do = fwAD.unpack_dual(out)
    if grad is None:
        return o.detach(), do.detach(), None
    grads = torch.autograd.grad((o * grad).sum(), (q, k, v))
    return o.detach(), do.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(b, h, n, d, dtype, device, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype) for _ in range(7)]


def check_numbers(n: int, device) -> dict:
    q, k, v, dq, dk, dv, g = _inputs(2, 4, n, 64, torch.float64, device)
    ref_o, ref_do, ref_g = _run("math", q, k, v, dq, dk, dv, g)
    out = {}
    for method in METHODS:
        f32 = [a.float() for a in (q, k, v, dq, dk, dv, g)]
        o, do, grads = _run(method, *f32)
        out[method] = {"o": _rel(o, ref_o), "jvp": _rel(do, ref_do),
                       **{f"grad_{x}": _rel(a, r) for x, a, r in zip("qkv", grads, ref_g)}}
    return {"length": n, "batch": 2, "heads": 4, "head_dim": 64, "rel_err_vs_fp64_math": out}


def time_and_memory(n: int, device, reps: int) -> list[dict]:
    q, k, v, dq, dk, dv, g = _inputs(4, 12, n, 64, torch.float32, device)
    rows = []
    for method in METHODS:
        try:
            _run(method, q, k, v, dq, dk, dv, g)  # warm-up (Triton compiles here)
        except torch.OutOfMemoryError:
            rows.append({"method": method, "length": n, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        timed = {}
        for label, grad in (("jvp_ms", None), ("jvp_backward_ms", g)):
            times = []
            for _ in range(reps):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                _run(method, q, k, v, dq, dk, dv, grad)
                torch.cuda.synchronize(device)
                times.append(1e3 * (time.perf_counter() - start))
            timed[label] = statistics.median(times)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _run(method, q, k, v, dq, dk, dv, g)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        rows.append({"method": method, "length": n, **timed, "peak_mib": peak})
    math_row = next((r for r in rows if r["method"] == "math" and "error" not in r), None)
    for row in rows:
        if math_row and "error" not in row:
            row["time_ratio_to_math"] = row["jvp_backward_ms"] / math_row["jvp_backward_ms"]
            row["memory_ratio_to_math"] = row["peak_mib"] / math_row["peak_mib"]
    return rows


def check_fused_attention(device, lengths=(256, 1024, 4096), check_length=1024,
                          reps=10) -> dict:
    """Section (e) of gpu_check: ``{"skipped": reason}`` without CUDA or the package."""
    if device.type != "cuda":
        return {"skipped": f"no CUDA device ({device}): the fused attention JVP needs one"}
    fused, why = attention_module._load_fused()
    if fused is None:
        return {"skipped": why}
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # math and chunked in true float32
    try:
        res = {"numbers": check_numbers(check_length, device), "speed": []}
        for n in lengths:
            res["speed"] += time_and_memory(n, device, reps)
        return res
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def table(res: dict) -> list[str]:
    """Markdown lines of section (e)."""
    if "skipped" in res:
        return [f"fused attention JVP: skipped ({res['skipped']})"]
    num = res["numbers"]
    lines = [f"fused attention JVP, float32 vs float64 math kernel (B {num['batch']}, H "
             f"{num['heads']}, N {num['length']}, D {num['head_dim']}), relative errors:", "",
             "| method | O | dO | dL/dq | dL/dk | dL/dv |", "|---|---|---|---|---|---|"]
    for method, e in num["rel_err_vs_fp64_math"].items():
        lines.append(f"| {method} | {e['o']:.1e} | {e['jvp']:.1e} | {e['grad_q']:.1e} | "
                     f"{e['grad_k']:.1e} | {e['grad_v']:.1e} |")
    lines += ["", "| method | N | JVP ms | JVP+backward ms | peak MiB | time vs math | "
              "memory vs math |", "|---|---|---|---|---|---|---|"]
    for r in res["speed"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['length']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['length']} | {r['jvp_ms']:.2f} | "
                     f"{r['jvp_backward_ms']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r.get('time_ratio_to_math', float('nan')):.2f}x | "
                     f"{r.get('memory_ratio_to_math', float('nan')):.2f}x |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--check-length", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", help="JSON path")
    args = ap.parse_args()
    res = check_fused_attention(torch.device(args.device),
                                tuple(int(n) for n in args.lengths.split(",")),
                                args.check_length, args.reps)
    print("\n".join(table(res)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
