import gzip

import numpy as np
import pytest
import torch

from meanflow import MeanFlowError
from meanflow.data import images as images_module
from meanflow.data import (
    load_cifar10_binary,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
)

Image = pytest.importorskip("PIL.Image")


def _idx(path, array, magic, compress=False):
    raw = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
    raw += np.asarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return str(path)


def _idx_pair(folder, prefix, n=5, compress=False):
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
    labels = np.arange(n, dtype=np.uint8) % 10
    ext = ".gz" if compress else ""
    _idx(folder / f"{prefix}-images-idx3-ubyte{ext}", pixels, 0x803, compress)
    _idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, 0x801, compress)
    return pixels, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    pixels, labels = _idx_pair(tmp_path, "train", compress=compress)
    ext = ".gz" if compress else ""
    data = load_idx(str(tmp_path / f"train-images-idx3-ubyte{ext}"),
                    str(tmp_path / f"train-labels-idx1-ubyte{ext}"))
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.images[0, 0, 0, 0] == -1.0 and data.images[0, 0, 0, 1] == 1.0
    expected = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1)[:, None]
    assert torch.allclose(data.images, expected, atol=1e-6)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert load_idx(str(tmp_path / f"train-images-idx3-ubyte{ext}")).labels is None


def test_fashion_mnist_directory(tmp_path, monkeypatch):
    _idx_pair(tmp_path, "train", n=4, compress=True)
    _idx_pair(tmp_path, "t10k", n=3)
    train = load_fashion_mnist(str(tmp_path))
    test = load_fashion_mnist(str(tmp_path), split="test")
    assert train.images.shape == (4, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    assert train.class_names[0] == "T-shirt/top" and len(train.class_names) == 10
    monkeypatch.setattr(images_module, "FASHION_MNIST_DIRS", [str(tmp_path)])
    assert len(load_fashion_mnist()) == 4  # directory=None searches the system dirs


def test_digits_upscaled_exactly():
    from sklearn.datasets import load_digits as sklearn_digits
    raw = torch.from_numpy(sklearn_digits().images.astype(np.float32)) / 8 - 1
    data = load_digits(16)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert torch.equal(data.images[:, 0, ::2, ::2], raw) and torch.equal(
        data.images[:, 0, 1::2, 1::2], raw)
    assert torch.equal(load_digits(8).images[:, 0], raw)
    assert load_digits(32).images.shape == (1797, 1, 32, 32)
    assert sorted(set(data.labels.tolist())) == list(range(10))


def _cifar_record(label, rgb):
    planes = np.stack([np.full((32, 32), v, np.uint8) for v in rgb])
    return bytes([label]) + planes.tobytes()


def test_cifar_binary_channel_order(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(_cifar_record(3, (255, 0, 0))
                                              + _cifar_record(9, (0, 255, 0)))
    data = load_cifar10_binary(str(tmp_path), split="test")
    assert data.images.shape == (2, 3, 32, 32) and data.labels.tolist() == [3, 9]
    assert data.images[0, :, 5, 7].tolist() == [1.0, -1.0, -1.0]
    assert data.images[1, :, 5, 7].tolist() == [-1.0, 1.0, -1.0]
    assert data.class_names[3] == "cat"
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}.bin").write_bytes(_cifar_record(i, (0, 0, 255)))
    train = load_cifar10_binary(str(tmp_path))
    assert train.labels.tolist() == [1, 2, 3, 4, 5] and train.images[0, 2].eq(1).all()


def _png(path, size=(8, 6), mode="RGB", color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def test_image_folder_classes_flat_gray_resize(tmp_path):
    _png(tmp_path / "cls" / "dog" / "a.png")
    _png(tmp_path / "cls" / "cat" / "b.png", color=(255, 0, 0))
    _png(tmp_path / "cls" / "cat" / "c.jpg")
    data = load_image_folder(str(tmp_path / "cls"))
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 3, 6, 8)
    assert data.images[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]

    _png(tmp_path / "flat" / "x.png", mode="L", color=(0,))
    _png(tmp_path / "flat" / "y.png", mode="L", color=(255,))
    (tmp_path / "flat" / "notes.txt").write_text("ignored")
    flat = load_image_folder(str(tmp_path / "flat"))
    assert flat.labels is None and flat.images.shape == (2, 1, 6, 8)
    assert flat.images[0].eq(-1).all() and flat.images[1].eq(1).all()

    _png(tmp_path / "flat" / "z.png", size=(5, 5))  # one RGB image: all become RGB
    with pytest.raises(MeanFlowError, match="--image-size S"):
        load_image_folder(str(tmp_path / "flat"))
    mixed = load_image_folder(str(tmp_path / "flat"), size=4)
    assert mixed.images.shape == (3, 3, 4, 4)
    assert mixed.images[1].eq(1).all()  # white grayscale stays white in every channel


def _bad_input(tmp_path, case, monkeypatch):
    if case in ("idx_magic", "idx_truncated", "idx_gzip"):
        path = tmp_path / "bad-idx3-ubyte"
        _idx(path, np.zeros((3, 4, 4)), 0x803 if case != "idx_magic" else 0x801)
        if case == "idx_truncated":
            path.write_bytes(path.read_bytes()[:-5])
        if case == "idx_gzip":
            path = tmp_path / "bad.gz"
            path.write_bytes(gzip.compress(bytes(range(256)) * 4)[:-12])
        return lambda: load_idx(str(path))
    if case == "idx_count":
        images = _idx(tmp_path / "i", np.zeros((3, 4, 4)), 0x803)
        labels = _idx(tmp_path / "l", np.zeros(2), 0x801)
        return lambda: load_idx(images, labels)
    if case == "fashion_missing":
        return lambda: load_fashion_mnist(str(tmp_path))
    if case == "fashion_system_missing":
        monkeypatch.setattr(images_module, "FASHION_MNIST_DIRS", [str(tmp_path / "none")])
        monkeypatch.setattr(images_module, "_dpkg_dirs", lambda package: [])
        return load_fashion_mnist
    if case == "cifar_pickled":
        for name in ["data_batch_1", "test_batch", "batches.meta"]:
            (tmp_path / name).write_bytes(b"\x80\x04pickle")
        return lambda: load_cifar10_binary(str(tmp_path), split="test")
    if case == "cifar_record":
        (tmp_path / "test_batch.bin").write_bytes(_cifar_record(1, (0, 0, 0))[:-1])
        return lambda: load_cifar10_binary(str(tmp_path), split="test")
    if case == "folder_empty":
        return lambda: load_image_folder(str(tmp_path))
    if case == "folder_no_images":
        (tmp_path / "readme.txt").write_text("hi")
        return lambda: load_image_folder(str(tmp_path))
    if case == "folder_corrupt":
        _png(tmp_path / "good.png")
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return lambda: load_image_folder(str(tmp_path))
    if case == "folder_layout":
        _png(tmp_path / "a.png")
        _png(tmp_path / "cat" / "b.png")
        return lambda: load_image_folder(str(tmp_path))
    if case == "folder_mixed":
        _png(tmp_path / "a.png", size=(8, 8))
        _png(tmp_path / "b.png", size=(9, 7))
        return lambda: load_image_folder(str(tmp_path))
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["idx_magic", "idx_truncated", "idx_gzip", "idx_count",
                                  "fashion_missing", "fashion_system_missing", "cifar_pickled",
                                  "cifar_record", "folder_empty", "folder_no_images",
                                  "folder_corrupt", "folder_layout", "folder_mixed"])
def test_bad_inputs_raise_one_clear_error(tmp_path, monkeypatch, case):
    with pytest.raises(MeanFlowError) as info:
        _bad_input(tmp_path, case, monkeypatch)()
    message = str(info.value)
    assert "\n" not in message
    expected = {"idx_magic": "magic", "idx_truncated": "truncated",
                "idx_gzip": "bad.gz: cannot read",
                "fashion_missing": "apt-get install dataset-fashion-mnist",
                "fashion_system_missing": "apt-get install dataset-fashion-mnist",
                "cifar_pickled": "unpickling", "cifar_record": "3073",
                "folder_empty": "empty", "folder_layout": "one layout",
                "folder_corrupt": "broken.png",
                "folder_mixed": "pass --image-size S (Python: size=S)"}
    assert expected.get(case, "") in message


def test_real_fashion_mnist_from_the_debian_package():
    """The files of Debian's dataset-fashion-mnist (installed by scripts/setup.sh as root)."""
    import os
    if not any(os.path.isdir(d) for d in images_module.FASHION_MNIST_DIRS):
        pytest.skip("dataset-fashion-mnist is not installed")
    train = load_fashion_mnist()
    assert tuple(train.images.shape) == (60000, 1, 28, 28)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    test = load_fashion_mnist(split="test")
    assert test.labels.bincount().tolist() == [1000] * 10
