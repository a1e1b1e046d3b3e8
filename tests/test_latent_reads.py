"""LatentShards reads rows with pread, not a memory map: the same values as ``np.load``
(float32 and float16 shards, any order, repeats, runs), nothing of the shard files mapped into
the process afterwards (so resident memory does not grow with the data read:
benchmarks/stream_memory.py), and one clear line for a truncated shard."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from meanflow import MeanFlowError
from meanflow.data.latents import FORMAT, META_NAME, VERSION, LatentShards


def write_latents(out, counts=(5, 5, 3), shape=(2, 4, 4), dtype="float32", seed=0):
    """A synthetic latents directory in the documented format; returns all moments."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, parts = [], []
    for k, n in enumerate(counts):
        moments = rng.normal(size=(n, 2, 2, *shape)).astype(dtype)
        np.save(os.path.join(out, f"moments-{k:05d}.npy"), moments)
        np.save(os.path.join(out, f"labels-{k:05d}.npy"), np.arange(n, dtype=np.int64) % 2)
        shards.append({"moments": f"moments-{k:05d}.npy", "labels": f"labels-{k:05d}.npy",
                       "count": n})
        parts.append(moments.astype(np.float32))
    meta = {"format": FORMAT, "version": VERSION, "count": sum(counts), "shape": list(shape),
            "flips": 2, "dtype": dtype, "scaling_factor": 0.18215, "shift_factor": None,
            "vae": os.path.join(str(out), "no-vae"), "image_size": 8 * shape[1],
            "source": None, "class_names": ["a", "b"], "shard_size": counts[0],
            "shards": shards, "complete": True}
    with open(os.path.join(out, META_NAME), "w") as f:
        json.dump(meta, f)
    return np.concatenate(parts)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_equal_np_load(tmp_path, dtype):
    everything = write_latents(str(tmp_path / "lat"), dtype=dtype)
    shards = LatentShards(str(tmp_path / "lat"))
    for indices in ([12, 0, 4, 4, 5, 6, 7, 9, 3], list(range(13)), [10], []):
        got = shards.moments(np.array(indices, np.int64))
        assert got.dtype == np.float32 and np.array_equal(got, everything[indices])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_reading_maps_nothing(tmp_path):
    write_latents(str(tmp_path / "lat"))
    shards = LatentShards(str(tmp_path / "lat"))
    shards.moments(np.arange(13))
    with open("/proc/self/maps") as f:
        assert "moments-0000" not in f.read()


def test_a_truncated_shard_is_one_clear_line(tmp_path):
    everything = write_latents(str(tmp_path / "lat"))
    path = tmp_path / "lat" / "moments-00001.npy"
    path.write_bytes(path.read_bytes()[:-100])
    shards = LatentShards(str(tmp_path / "lat"))
    assert shards.moments(np.array([0, 4])).shape == (2, 2, 2, 2, 4, 4)  # shard 0 is fine
    assert np.array_equal(shards.moments(np.array([0, 4])), everything[[0, 4]])
    with pytest.raises(MeanFlowError, match=r"moments-00001\.npy: .*truncated") as info:
        shards.moments(np.array([6]))
    assert "\n" not in str(info.value)
