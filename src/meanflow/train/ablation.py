"""The paper's ablations (MeanFlow, Table 1) and the objectives, on any data: one training run per
setting from the same preset and seed, each evaluated at 1 and 2 steps by the protocol of
``meanflow eval`` (:func:`meanflow.eval.run_eval.evaluate_run`, in this process).

The paper's figures are FID-50K of 1-step samples of DiT-B/4 on ImageNet 256 after 80 epochs;
ours are the project's metrics (SWD for vectors, FD in a feature network's space for images) on
whatever data the study runs on, so only the *ordering* within a study can be compared.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

from ..config.presets import configure
from ..config.schema import TrainConfig
from ..errors import MeanFlowError, check
from ..eval.run_eval import evaluate_run
from . import loop


@dataclass
class Study:
    """One ablation: ``settings`` maps a label to its config overrides; ``paper`` the label's
    figure in the paper (1-NFE FID, ImageNet 256, B/4, 80 epochs), where it reports one."""

    title: str
    settings: dict[str, list[tuple[str, object]]]
    paper: dict[str, float] = field(default_factory=dict)
    default: str = ""  # the paper's choice


def _one(key: str, values, labels=None) -> dict[str, list[tuple[str, object]]]:
    labels = labels or [str(v) for v in values]
    return {label: [(key, v)] for label, v in zip(labels, values)}


STUDIES = {
    "ratio": Study(
        "fraction of samples with r != t (Table 1a)",
        {  # a fixed share over the run, also under a preset with a schedule (toy-2d)
            label: [("time.ratio", v), ("time.ratio_start", -1.0)]
            for label, v in zip(["0%", "25%", "50%", "100%"], [0.0, 0.25, 0.5, 1.0])
        },
        {"0%": 328.91, "25%": 61.06, "50%": 63.14, "100%": 67.32},
        "25%",
    ),
    "tangent": Study(
        "JVP tangent on (z, r, t) (Table 1b)",
        _one(
            "loss.tangent",
            ["v,0,1", "v,0,0", "v,1,0", "v,1,1"],
            ["(v,0,1)", "(v,0,0)", "(v,1,0)", "(v,1,1)"],
        ),
        {"(v,0,1)": 61.06, "(v,0,0)": 268.06, "(v,1,0)": 329.22, "(v,1,1)": 137.96},
        "(v,0,1)",
    ),
    "time-input": Study(
        "time conditioning of the network (Table 1c)",
        _one(
            "model.time_input",
            ["t,t-r", "t,r", "t,r,t-r", "t-r"],
            ["(t, t-r)", "(t, r)", "(t, r, t-r)", "t-r only"],
        ),
        {},
        "(t, t-r)",
    ),
    "sampler": Study(
        "time sampler, the same law for t and r (Table 1d)",
        {
            label: [
                ("time.dist", dist),
                ("time.mean", mean),
                ("time.std", std),
                ("time.r_mean", None),
                ("time.r_std", None),
            ]
            for label, dist, mean, std in (
                ("uniform(0, 1)", "uniform", -0.4, 1.0),
                ("lognorm(-0.2, 1.0)", "logit-normal", -0.2, 1.0),
                ("lognorm(-0.2, 1.2)", "logit-normal", -0.2, 1.2),
                ("lognorm(-0.4, 1.0)", "logit-normal", -0.4, 1.0),
                ("lognorm(-0.4, 1.2)", "logit-normal", -0.4, 1.2),
            )
        },
        {},
        "lognorm(-0.4, 1.0)",
    ),
    "p": Study(
        "adaptive weighting power p (Table 1e)",
        _one("loss.p", [0.0, 0.5, 1.0, 1.5, 2.0]),
        {"0.0": 79.75, "0.5": 63.98, "1.0": 61.06, "1.5": 66.57, "2.0": 69.19},
        "1.0",
    ),
    "omega": Study(
        "guidance omega at kappa = 0, class-conditional data (Table 1f)",
        # Table 1f varies omega in the paper's Eq. for v~ without the kappa term of its appendix
        {
            f"{w}": [("guidance.omega", w), ("guidance.kappa", 0.0)]
            for w in (1.0, 1.5, 2.0, 3.0, 5.0)
        },
        {"1.0": 61.06, "3.0": 15.53},
        "3.0",
    ),
    "kappa": Study(
        "guidance kappa at omega = 1 (effective scale 1 / (1 - kappa))",
        {f"{k}": [("guidance.omega", 1.0), ("guidance.kappa", k)] for k in (0.0, 0.25, 0.5, 0.75)},
        {},
        "",
    ),
    "objective": Study(
        "objective: flow matching, MeanFlow, improved MeanFlow, AlphaFlow",
        _one("objective", ["flow-matching", "meanflow", "imf", "alphaflow"]),
        {},
        "",
    ),
}


def study(name: str) -> Study:
    check(name in STUDIES, f"unknown study {name!r}; use one of {', '.join(STUDIES)}")
    return STUDIES[name]


def _slug(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
    return keep.strip("_") or "setting"


def evaluate(run_dir: str, reference: str, steps: int, num: int, device: str) -> dict:
    """What ``meanflow eval --run RUN_DIR --reference REFERENCE --steps STEPS --num NUM``
    prints, computed in this process (:func:`meanflow.eval.run_eval.evaluate_run` with its
    defaults: the primary EMA, seed 0, the default metrics)."""
    try:
        return evaluate_run(run_dir, reference, steps=steps, num=num, device=device)
    except MeanFlowError as exc:
        raise MeanFlowError(f"evaluating {run_dir}: {exc}") from None


def headline(result: dict) -> tuple[str, float]:
    """The one number of a ``meanflow eval`` result a study table reports: FD for images,
    SWD for vectors."""
    metrics = result.get("metrics", result)
    for key in ("fd", "swd"):
        if key in metrics:
            return key, float(metrics[key])
    raise ValueError(f"no fd or swd in {sorted(metrics)}")


def run_study(
    name: str,
    base: list[tuple[str, object]],
    out: str,
    *,
    preset: str | None,
    reference: str,
    num: int = 2000,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Train and evaluate every setting of study ``name``; returns one row per setting. A
    setting whose run already finished (its ``eval.json`` exists) is reused unless
    ``overwrite``."""
    s = study(name)
    rows = []
    for label, overrides in s.settings.items():
        run_dir = os.path.join(out, "runs", _slug(label))
        done = os.path.join(run_dir, "ablation-eval.json")
        if os.path.exists(done) and not overwrite:
            with open(done) as f:
                rows.append(json.load(f))
            log(f"{name}: {label}: reused {run_dir}")
            continue
        cfg = configure(TrainConfig(), preset, [*base, *overrides])
        settings = ", ".join(f"{k}={v}" for k, v in overrides)
        log(f"{name}: {label}: training {cfg.steps} steps ({settings})")
        result = loop.train(cfg, run_dir, overwrite=True, progress=progress)
        check(
            result.stopped_by is None,
            f"{name}: {label}: training stopped by "
            f"{result.stopped_by} at step {result.step}; rerun the same command to go on "
            "(finished settings are reused)",
        )
        row = {
            "study": name,
            "setting": label,
            "overrides": [[k, v] for k, v in overrides],
            "train_s": result.seconds,
            "steps": cfg.steps,
            "paper_fid": s.paper.get(label),
        }
        for k in (1, 2):
            metric, value = headline(evaluate(run_dir, reference, k, num, device))
            row["metric"], row[f"{k}-step"] = metric, value
        with open(done, "w") as f:
            json.dump(row, f, indent=1)
        rows.append(row)
    return rows


def write_report(name: str, rows: list[dict], out: str, data: str) -> str:
    """``table.md``, ``results.csv`` and ``plot.png`` of a study in ``out``; returns the table."""
    s = study(name)
    metric = rows[0]["metric"].upper() if rows else "-"
    lines = [
        f"**{s.title}** on `{data}`, {rows[0]['steps'] if rows else 0} steps per setting; "
        f"{metric} of 1- and 2-step samples (lower is better); paper: 1-NFE FID, "
        "ImageNet 256, DiT-B/4, 80 epochs.",
        "",
        f"| setting | {metric} 1-step | {metric} 2-step | paper FID | train s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        paper = "-" if r.get("paper_fid") is None else f"{r['paper_fid']:.2f}"
        mark = " (paper's choice)" if r["setting"] == s.default else ""
        lines.append(
            f"| {r['setting']}{mark} | {r['1-step']:.4f} | {r['2-step']:.4f} | "
            f"{paper} | {r['train_s']:.0f} |"
        )
    ordering = _ordering(rows)
    if ordering:
        lines += ["", ordering]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["study", "setting", "metric", "1-step", "2-step", "paper_fid", "train_s", "steps"]
        )
        for r in rows:
            w.writerow(
                [
                    name,
                    r["setting"],
                    r["metric"],
                    r["1-step"],
                    r["2-step"],
                    r.get("paper_fid"),
                    r["train_s"],
                    r["steps"],
                ]
            )
    _plot(s, rows, os.path.join(out, "plot.png"))
    return table


def _ordering(rows: list[dict]) -> str:
    """One sentence: does our 1-step ordering of the settings the paper reports match its own?"""
    both = [r for r in rows if r.get("paper_fid") is not None]
    if len(both) < 2:
        return ""
    ours = [r["setting"] for r in sorted(both, key=lambda r: r["1-step"])]
    paper = [r["setting"] for r in sorted(both, key=lambda r: r["paper_fid"])]
    verdict = "matches" if ours == paper else "differs from"
    return (
        f"Best to worst, ours (1-step): {', '.join(ours)}; the paper: {', '.join(paper)}. "
        f"Our ordering {verdict} the paper's."
    )


def _plot(s: Study, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["1-step"] for r in rows], 0.4, label="1-step")
    ax.bar([i + 0.2 for i in x], [r["2-step"] for r in rows], 0.4, label="2-step")
    ax.set_xticks(list(x), [r["setting"] for r in rows], fontsize=8)
    ax.set_ylabel(rows[0]["metric"].upper() if rows else "")
    ax.set_title(s.title, fontsize=9)
    if any(r.get("paper_fid") is not None for r in rows):
        twin = ax.twinx()
        pts = [(i, r["paper_fid"]) for i, r in zip(x, rows) if r.get("paper_fid") is not None]
        twin.plot([p[0] for p in pts], [p[1] for p in pts], "ko--", label="paper FID")
        twin.set_ylabel("paper FID (ImageNet)")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["STUDIES", "Study", "study", "run_study", "write_report", "evaluate", "headline"]
