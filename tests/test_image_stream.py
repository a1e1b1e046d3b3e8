"""Image folders streamed from disk (``--set stream=true``): the reader's pixels are exactly
``load_image_folder``'s, a streamed run ends bitwise equal to the in-memory run and resumes
exactly, and bad files are reported as one line naming the file when their batch is read."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from cli_helpers import run

Image = pytest.importorskip("PIL.Image")

from test_train_images import make_class_folder  # noqa: E402

from meanflow import MeanFlowError  # noqa: E402
from meanflow.config.schema import TrainConfig  # noqa: E402
from meanflow.data.image_stream import ImageFolderReader, is_image_folder  # noqa: E402
from meanflow.data.image_folder import load_image_folder  # noqa: E402
from meanflow.runs.checkpoint import load_latest_good  # noqa: E402
from meanflow.train.batches import open_training_data  # noqa: E402

TRAIN = ["--preset", "unet-small", "--batch-size", "8", "--hflip", "--set", "ckpt_every=3",
         "--set", "log_every=3", "--set", "grid_every=0", "--set", "grid_num=4", "--quiet",
         "--threads", "1"]  # one thread: fast beside other jobs, the same in every run
STREAM = ["--set", "stream=true", "--set", "workers=1"]


def mixed_folder(root) -> str:
    """Two classes of different sizes and modes: grey 9x7, RGB 12x12, palette, grey+alpha,
    RGBA, a JPEG."""
    rng = np.random.default_rng(1)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (7, 9), dtype=np.uint8), "L").save(root / "a" / f"g{i}.png")
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").save(
            root / "b" / f"c{i}.png")
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), "RGB").convert(
        "P").save(root / "a" / "p.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 2), dtype=np.uint8), "LA").save(root / "a" / "la.png")
    Image.fromarray(rng.integers(0, 256, (6, 11, 4), dtype=np.uint8), "RGBA").save(
        root / "b" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(
        root / "b" / "j.jpg", quality=90)
    return str(root)


def _weights(run_dir):
    _, tensors, _ = load_latest_good(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


def test_reader_pixels_equal_the_in_memory_loader(tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    memory = load_image_folder(folder, 8)
    reader = ImageFolderReader(folder, 8)
    assert len(reader) == len(memory) == 10 and reader.sample_shape == (3, 8, 8)
    assert reader.class_names == memory.class_names == ["a", "b"]
    order = np.random.default_rng(0).permutation(len(reader))
    x, y = reader.batch(order)
    assert x.dtype == torch.float32 and torch.equal(x, memory.images[torch.from_numpy(order)])
    assert torch.equal(y, memory.labels[torch.from_numpy(order)])
    # pickled into a worker process: the same reader
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.batch(order[:4])[0], x[:4])
    # a grey-only folder at its native size stays one channel
    grey = make_class_folder(tmp_path / "grey", per_class=3, size=8)
    memory, reader = load_image_folder(grey), ImageFolderReader(grey)
    assert reader.sample_shape == (1, 8, 8) == tuple(memory.images.shape[1:])
    assert torch.equal(reader.batch(np.arange(6))[0], memory.images)
    assert ImageFolderReader(grey, labelled=False).batch(np.arange(2))[1] is None


def test_sizes_are_checked_lazily_naming_the_file(tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    reader = ImageFolderReader(folder)  # no --image-size: the first image's 9x7 (W x H)
    assert reader.sample_shape == (3, 7, 9)
    assert reader.batch(np.arange(3))[0].shape == (3, 3, 7, 9)
    with pytest.raises(MeanFlowError, match=r"la\.png is 8x8.*--image-size"):
        reader.batch(np.arange(5))


def test_open_training_data_streams_only_image_folders(tmp_path):
    folder = make_class_folder(tmp_path / "f", per_class=4)
    data = open_training_data(TrainConfig(data=folder, stream=True))
    assert data.streamed and data.kind == "images" and data.shape == (1, 8, 8) and len(data) == 8
    assert data.class_names == ["circle", "square"] and data.labels.tolist() == [0] * 4 + [1] * 4
    assert not open_training_data(TrainConfig(data=folder)).streamed
    assert not is_image_folder("digits") and not is_image_folder(str(tmp_path / "missing"))


def test_streamed_run_equals_in_memory_and_resumes_exactly(tmp_path, capsys):
    data = make_class_folder(tmp_path / "data", per_class=8, size=10)
    common = ["--data", data, "--image-size", "8", *TRAIN]
    memory, stream, parts = (str(tmp_path / n) for n in ("memory", "stream", "parts"))
    assert run(capsys, "train", *common, "--steps", "6", "--out", memory)[0] == 0
    assert run(capsys, "train", *common, *STREAM, "--steps", "6", "--out", stream)[0] == 0
    assert run(capsys, "train", *common, *STREAM, "--steps", "3", "--out", parts)[0] == 0
    assert run(capsys, "train", *common, *STREAM, "--steps", "6", "--out", parts)[0] == 0
    a, b, c = _weights(memory), _weights(stream), _weights(parts)
    assert a.keys() == b.keys() == c.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    os.remove(os.path.join(parts, "samples-1step.png"))  # a finished run redraws its preview
    code, out, _ = run(capsys, "train", *common, *STREAM, "--steps", "6", "--out", parts)
    assert code == 0 and '"complete": true' in out
    assert os.path.isfile(os.path.join(parts, "samples-1step.png"))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_one_line_naming_it(tmp_path, capsys, workers):
    data = make_class_folder(tmp_path / "data", per_class=4)
    bad = os.path.join(data, "square", "001.png")
    with open(bad, "rb") as f:
        head = f.read(60)  # a valid header, the pixels cut off
    with open(bad, "wb") as f:
        f.write(head)
    code, _, err = run(capsys, "train", "--data", data, "--out", str(tmp_path / "run"),
                       "--steps", "4", *TRAIN, "--set", "stream=true",
                       "--set", f"workers={workers}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("meanflow: error: ") and "001.png: cannot read the image" in lines[0]
