"""Sharded sampling for FID-50K: noise that depends only on (seed, row), streamed .npy/.npz
writers with bounded memory, and a real 2-process torchrun run that writes the very file one
process writes."""

import io
import json
import os
import socket
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from cli_helpers import run

from meanflow import MeanFlowError
from meanflow.cli import main
from meanflow.plotting import to_uint8
from meanflow.runs.noise import NOISE_CHUNK, iter_noise, sample_noise
from meanflow.runs.sample_files import rank_rows, write_npy, write_npz
from meanflow.train import load_run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-step class-conditional U-Net (8 channels) on 8x8 digits: cheap images."""
    out = str(tmp_path_factory.mktemp("digits") / "run")
    assert main(["train", "--data", "digits", "--image-size", "8", "--preset", "digits-small",
                 "--set", "model.channels=8", "--steps", "2", "--batch-size", "8", "--out", out,
                 "--quiet"]) == 0
    return out


def test_noise_of_a_row_depends_only_on_seed_and_row():
    full = sample_noise((3,), seed=5, start=0, stop=700)
    assert full.shape == (700, 3) and abs(float(full.mean())) < 0.15
    assert abs(float(full.std()) - 1) < 0.1
    pieces = torch.cat([sample_noise((3,), 5, a, b) for a, b in ((0, 100), (100, 300), (300, 700))])
    assert torch.equal(pieces, full)
    assert torch.equal(sample_noise((3,), 5, 0, 300), full[:300])  # not a function of num
    for batch in (1, 7, NOISE_CHUNK, 1000):
        blocks = list(iter_noise((3,), 5, 250, 700, batch))
        assert torch.equal(torch.cat(blocks), full[250:])
        # batches end at multiples of batch counted from row 0
        ends = np.cumsum([len(b) for b in blocks]) + 250
        assert all(e % batch == 0 for e in ends[:-1]) and ends[-1] == 700
    assert not torch.allclose(sample_noise((3,), 6, 0, 700), full)
    # chunks are independent draws, not copies of one another
    assert not torch.allclose(full[:NOISE_CHUNK], full[NOISE_CHUNK:2 * NOISE_CHUNK])


def test_rank_rows_split_whole_chunks_in_order():
    for num in (1, 255, 600, 5000):
        for world in (1, 2, 3, 8):
            ranges = [rank_rows(num, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all((start % NOISE_CHUNK == 0 or start == num) and start <= stop
                       for start, stop in ranges)
            assert ranges[0][1] > 0  # rank 0 always has rows
    assert [rank_rows(600, r, 2) for r in range(2)] == [(0, 512), (512, 600)]
    assert [rank_rows(600, r, 4) for r in range(4)] == [(0, 256), (256, 512), (512, 600), (600, 600)]


def test_iter_samples_range_equals_those_rows_of_the_full_run(tiny_run, digits_run):
    vectors = load_run(tiny_run)
    full = vectors.sample(600, seed=3, steps=2)
    for start, stop, batch in ((0, 1, None), (100, 300, 7), (255, 257, None), (256, 600, 256),
                               (599, 600, 1)):
        part = torch.cat(list(vectors.iter_samples(600, seed=3, steps=2, start=start,
                                                   stop=stop, batch=batch))).numpy()
        # the noise is the same; a batch of another size may round the last bit differently
        np.testing.assert_allclose(part, full[start:stop], rtol=0, atol=1e-6)
    # the same batches (boundaries at multiples of batch) give the same bits
    whole = vectors.sample(600, seed=3, steps=2, batch=100)
    part = torch.cat(list(vectors.iter_samples(600, seed=3, steps=2, batch=100, start=250)))
    assert np.array_equal(part.numpy(), whole[250:])
    assert list(vectors.iter_samples(600, start=600)) == []
    with pytest.raises(MeanFlowError, match="start <= stop"):
        list(vectors.iter_samples(600, start=300, stop=200))
    images = load_run(digits_run)
    labels = torch.arange(300) % 10
    full = images.sample(300, seed=1, labels=labels, guidance=2.0)
    part = torch.cat(list(images.iter_samples(300, seed=1, labels=labels, guidance=2.0,
                                              start=37, stop=290, batch=50)))
    np.testing.assert_allclose(part.numpy(), full[37:290], rtol=0, atol=1e-6)


def test_streamed_npy_bytes_are_those_of_np_save():
    x = np.random.default_rng(0).normal(size=(70, 3, 2)).astype(np.float32)
    streamed, saved = io.BytesIO(), io.BytesIO()
    write_npy(streamed, x.shape, np.float32, (x[i:i + 16] for i in range(0, 70, 16)))
    np.save(saved, x)
    assert streamed.getvalue() == saved.getvalue()
    with pytest.raises(MeanFlowError, match="wrote 64 rows of 70"):
        write_npy(io.BytesIO(), x.shape, np.float32, (x[i:i + 16] for i in range(0, 64, 16)))


def test_streamed_npz_holds_one_block_at_a_time(tmp_path):
    """48 MB of images through write_npz with a peak of a few blocks (1 MB each)."""
    block = np.full((16, 128, 128, 4), 7, dtype=np.uint8)  # 1 MiB

    def blocks():
        for _ in range(48):
            yield block.copy()

    path = str(tmp_path / "big.npz")
    tracemalloc.start()
    try:
        write_npz(path, blocks(), (48 * 16, 128, 128, 4), np.arange(48 * 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2 ** 20, peak
    with np.load(path, mmap_mode="r") as z:
        assert z["arr_0"].shape == (768, 128, 128, 4) and int(z["arr_0"][-1, -1, -1, -1]) == 7
        assert z["arr_1"].dtype == np.int64 and z["arr_1"][-1] == 767


def test_sample_npz_is_the_adm_layout_of_the_in_memory_samples(digits_run, tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    code, stdout, err = run(capsys, "sample", "--run", digits_run, "--num", "300", "--seed", "4",
                            "--out", out)
    assert code == 0, err
    assert json.loads(stdout)["num"] == 300 and "sampling" in err  # the progress bar
    loaded = load_run(digits_run)
    labels = torch.arange(300) % 10
    reference = to_uint8(loaded.sample(300, seed=4, labels=labels))
    with np.load(out) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (300, 8, 8, 1)
        assert np.array_equal(z["arr_0"], reference)
        assert z["arr_1"].dtype == np.int64 and np.array_equal(z["arr_1"], labels.numpy())
    with zipfile.ZipFile(out) as zf:  # stored, as np.savez writes it: the ADM evaluator streams it
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # no part or tmp files left
    code, stdout, err = run(capsys, "sample", "--run", digits_run, "--num", "5", "--class",
                            "none", "--quiet", "--out", str(tmp_path / "n.npz"))
    assert code == 0 and err == ""
    with np.load(tmp_path / "n.npz") as z:
        assert z.files == ["arr_0"]


def test_png_is_refused_under_torchrun(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, stdout, err = run(capsys, "sample", "--run", tiny_run, "--num", "5",
                            "--out", str(tmp_path / "s.png"))
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert "without torchrun" in err and not os.listdir(tmp_path)


def test_a_failing_check_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    code, stdout, err = run(capsys, "sample", "--run", tiny_run, "--num", "5", "--guidance",
                            "2", "--out", str(tmp_path / "s.npy"))
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "--guidance" in err
    assert not os.listdir(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "meanflow", *argv, "--threads", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ext,num", [(".npy", 600), (".npz", 300), (".npy", 100)])
def test_two_processes_write_the_file_one_process_writes(ext, num, tiny_run, digits_run,
                                                         tmp_path, capsys):
    """torchrun --nproc_per_node=2 gives the bytes of the single-process file. Rank 0 samples
    rows 0-511 and rank 1 rows 512-599 of 600; of 300, 0-255 and 256-299; of 100 rank 1 has
    none. torchrun claims --run and --num, so the command spells them --run-dir and
    --num-samples."""
    run_dir = tiny_run if ext == ".npy" else digits_run
    one, two = str(tmp_path / f"one{ext}"), str(tmp_path / f"two{ext}")
    args = ["sample", "--run-dir", run_dir, "--num-samples", str(num), "--seed", "2",
            "--steps", "2"]
    code, _, err = run(capsys, *args, "--out", one, "--quiet")
    assert code == 0, err
    done = _torchrun(*args, "--out", two)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["out"] == two  # rank 0 only
    assert "sampling (rank 0 of 2)" in done.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(one), os.path.basename(two)])
    if ext == ".npy":
        assert open(one, "rb").read() == open(two, "rb").read()  # bit for bit
        assert np.load(two).shape == (num, 2)
    else:
        with np.load(one) as a, np.load(two) as b:
            assert a["arr_0"].shape == (num, 8, 8, 1)
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
