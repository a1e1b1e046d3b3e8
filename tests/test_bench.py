"""Smoke test of the speed benchmarks (benchmarks/train_step.py, benchmarks/sample_speed.py):
smallest settings, CPU, as subprocesses; checks the JSON they write. Also the shared helpers of
benchmarks/results_io.py (tables, interleaved timing, /proc memory fields)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(script: str, out: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", script),
                             "--device", "cpu", "--threads", "1", "--out", out, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(proc: subprocess.Popen, out: str) -> dict:
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert os.path.exists(os.path.join(out, "table.md"))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_train_step_and_sample_speed_write_their_fields(tmp_path):
    train_out, sample_out = str(tmp_path / "train"), str(tmp_path / "sample")
    train = _start("train_step.py", train_out, "--networks", "tiny", "--rounds", "1",
                   "--steps-per-round", "1", "--warmup", "1", "--ratios", "0.25", "--modes",
                   "full", "--no-backends", "--memory-steps", "1")
    samp = _start("sample_speed.py", sample_out, "--network", "tiny", "--batch", "32",
                  "--rounds", "1", "--euler-steps", "2", "--stream-num", "300")
    result = _results(train, train_out)
    (net,) = result["networks"]
    assert net["network"] == "tiny"
    names = [row["name"] for row in net["rows"]]
    assert names[0] == "flow matching" and len(names) == 2
    for row in net["rows"]:
        for key in ("ms_median", "ms_q1", "ms_q3", "ratio", "peak_mib"):
            assert isinstance(row[key], float), (key, row)
        # the tiny MLP's step may add less than a page of RSS: then no ratio, never a division
        fm_peak = net["rows"][0]["peak_mib"]
        if fm_peak >= 0.5:
            assert row["memory_ratio"] == pytest.approx(row["peak_mib"] / fm_peak), row
        else:
            assert row["memory_ratio"] is None, row
        # the summary figures follow from the recorded per-round times (the same rounds for
        # every row, so the ratio is the median of the per-round quotients)
        rounds = row["ms_rounds"]
        assert len(rounds) == len(net["rows"][0]["ms_rounds"]) >= 1 and min(rounds) > 0
        assert row["ms_median"] == pytest.approx(statistics.median(rounds))
        assert row["ms_min"] == min(rounds) and row["ms_max"] == max(rounds)
        assert row["ms_min"] <= row["ms_q1"] <= row["ms_median"] <= row["ms_q3"] <= row["ms_max"]
        assert row["ratio"] == pytest.approx(statistics.median(
            a / b for a, b in zip(rounds, net["rows"][0]["ms_rounds"])))
    assert net["rows"][0]["ratio"] == 1.0
    assert net["rows"][1]["jvp"] == "full" and net["rows"][1]["r_ne_t"] == 0.25
    assert result["load_before"] and result["threads"] == 1

    result = _results(samp, sample_out)
    rows = result["speed"]["rows"]
    assert [row["name"] for row in rows] == ["bare network forward", "meanflow.sample, 1 step",
                                             "flow-matching Euler, 2 steps"]
    forward = rows[0]["s_rounds"]
    for row in rows:
        rounds = row["s_rounds"]
        assert len(rounds) == len(forward) >= 1 and min(rounds) > 0
        assert row["s_per_batch"] == pytest.approx(statistics.median(rounds))
        assert row["images_per_s"] == pytest.approx(32 / row["s_per_batch"])  # --batch 32
        assert row["throughput_ratio_to_forward"] == pytest.approx(
            statistics.median(f / s for f, s in zip(forward, rounds)))
    assert rows[0]["throughput_ratio_to_forward"] == 1.0
    assert result["speed"]["one_step_ratio"] == rows[1]["throughput_ratio_to_forward"]
    stream = result["stream"]
    small, big = stream["runs"]
    assert (small["num"], big["num"]) == (30, 300)
    assert (small["rows_in_file"], big["rows_in_file"]) == (30, 300)
    for run in (small, big):  # 8x8 grey digits: 64 float32 values a sample
        assert run["all_samples_float32_mib"] == pytest.approx(run["num"] * 64 * 4 / 2 ** 20)
        assert run["peak_growth_mib"] >= 0  # VmHWM never falls below the starting VmRSS
        # a uint8 .npz of num x 8 x 8 x 1 holds at least the num * 64 bytes
        assert run["file_mib"] >= run["num"] * 64 / 2 ** 20
    assert stream["excess_mib"] == pytest.approx(big["peak_growth_mib"] - small["peak_growth_mib"])
    assert stream["bounded"] is (stream["excess_mib"] < 0.25 * big["all_samples_float32_mib"])


def _results_io():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import results_io
    finally:
        sys.path.pop(0)
    return results_io


def test_markdown_table_rows_keep_their_format():
    rio = _results_io()
    assert rio.md_table(["a", "b", "c"], [["x", 1.5, ""], [None, "", "z"]]) == [
        "| a | b | c |", "|---|---|---|", "| x | 1.5 | |", "| None | | z |"]
    assert rio.md_row("x", rio.maybe(None), rio.maybe(2.345, ".2f", "x")) == "| x | - | 2.35x |"


def test_interleaved_times_order_counts_and_probe():
    import torch

    rio = _results_io()
    log = []
    calls = {name: (lambda n=name: log.append(n)) for name in "abc"}

    class Probe:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            log.append("<" + self.name)

        def __exit__(self, *exc):
            log.append(self.name + ">")

    cpu = torch.device("cpu")
    times = rio.interleaved_times(calls, cpu, rounds=3, repeats=2, rotate=True, probe=Probe)
    assert log == ["<a", "a", "a", "a>", "<b", "b", "b", "b>", "<c", "c", "c", "c>",
                   "<b", "b", "b", "b>", "<c", "c", "c", "c>", "<a", "a", "a", "a>",
                   "<c", "c", "c", "c>", "<a", "a", "a", "a>", "<b", "b", "b", "b>"]
    assert {name: len(v) for name, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    log.clear()
    times = rio.interleaved_times(calls, cpu, rounds=2, repeats=3, block=True)
    assert log == list("aaabbbcccaaabbbccc")
    assert all(len(v) == 2 and min(v) >= 0 for v in times.values())


def test_read_kib_and_status_mib():
    rio = _results_io()
    found = rio.read_kib("/proc/self/status", ("VmRSS", "VmHWM"))
    assert set(found) == {"VmRSS", "VmHWM"} and found["VmHWM"] >= found["VmRSS"] > 0
    assert rio.status_mib("VmRSS") > 0
    assert rio.read_kib("/proc/self/no-such-file", ("VmRSS",)) == {}
    with pytest.raises(KeyError):
        rio.status_mib("NoSuchField")
