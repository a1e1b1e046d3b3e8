"""Shared by the benchmark scripts: where results go and how optional figures print."""

from __future__ import annotations

import json
import os


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


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory field (e.g. ``VmHWM``, ``VmRSS``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)
