"""Shared by the benchmark scripts: where results go, how tables and optional figures print,
how interleaved timing rounds run and how process memory is read."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext


def save_results(out: str | None, result: dict, table: str) -> None:
    """Write ``result`` as ``OUT/results.json`` and ``table`` as ``OUT/table.md`` (when
    ``out`` is given)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")


def maybe(value, spec: str = ".0f", suffix: str = "") -> str:
    """``value`` formatted with ``spec`` (and ``suffix``), or ``-`` when it is None."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def md_row(*cells) -> str:
    """One Markdown table row, ``| a | b |``; an empty cell prints as ``| |``."""
    return "|" + "".join(f" {c} |" if c != "" else " |" for c in cells)


def md_table(header, rows=()) -> list[str]:
    """The lines of a Markdown table: the header, the ``|---|`` rule and ``rows`` (cell lists)."""
    return [md_row(*header), "|" + "---|" * len(header)] + [md_row(*row) for row in rows]


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def interleaved_times(calls: dict, device, rounds: int, repeats: int = 1, *,
                      rotate: bool = False, block: bool = False, probe=None) -> dict:
    """Seconds per call of each of ``calls`` (name -> function), timed in ``rounds`` rounds that
    run every call ``repeats`` times in turn (in an order rotated by one each round when
    ``rotate``), each timing between two :func:`sync`. ``block``: the ``repeats`` calls are timed
    together and one mean per round is kept (otherwise one time per call). ``probe(name)``: a
    context manager around each call's turn in a round, outside the timed span (memory peaks)."""
    names = list(calls)
    times = {name: [] for name in names}
    for k in range(rounds):
        shift = k % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            with probe(name) if probe else nullcontext():
                if block:
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        fn()
                    sync(device)
                    times[name].append((time.perf_counter() - start) / repeats)
                    continue
                for _ in range(repeats):
                    sync(device)
                    start = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - start)
    return times


def read_kib(path: str, keys) -> dict[str, int]:
    """The ``keys`` fields (kB) of a ``/proc`` status-like file (``/proc/PID/status``,
    ``smaps_rollup``) that it holds; {} when it cannot be read (a process that has ended)."""
    found = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    found[name] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return found


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory field (e.g. ``VmHWM``, ``VmRSS``) in MiB."""
    found = read_kib("/proc/self/status", (key,))
    if key not in found:
        raise KeyError(key)
    return found[key] / 1024
