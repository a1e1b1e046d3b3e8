"""The noise that sampling starts from: seeded chunks, so row i's noise depends on the seed
and i alone, never on the range asked for, the batch, the device or the number of processes
(what makes sharded sampling and ``meanflow sample --shard`` give the same rows)."""

from __future__ import annotations

import hashlib

import torch

from ..errors import check

__all__ = ["NOISE_CHUNK", "chunk_generator", "iter_noise", "sample_noise"]

# Rows of noise drawn from one generator: row i is row i % NOISE_CHUNK of chunk i // NOISE_CHUNK.
NOISE_CHUNK = 256


def chunk_generator(seed: int, k: int) -> torch.Generator:
    """The CPU generator of noise chunk ``k`` for ``seed``: seeded by a hash of (seed, k)."""
    digest = hashlib.blake2b(f"meanflow-noise:{int(seed)}:{int(k)}".encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


def iter_noise(shape: tuple[int, ...], seed: int, start: int, stop: int, batch: int):
    """Standard normal noise for rows ``[start, stop)``, float32 CPU tensors split at the
    multiples of ``batch`` (counted from row 0, so a range that starts mid-batch first yields
    the rest of that batch). Chunk k (rows ``k * NOISE_CHUNK`` onwards) is always drawn whole
    from :func:`chunk_generator` ``(seed, k)``, so a row's noise never depends on the range,
    the batch, the device or the number of processes."""
    check(batch >= 1, f"batch must be >= 1, got {batch}")
    pending: list[torch.Tensor] = []
    have = start % batch  # rows of the first batch that lie before start
    for k in range(start // NOISE_CHUNK, -(-stop // NOISE_CHUNK)):
        lo, hi = max(start, k * NOISE_CHUNK), min(stop, (k + 1) * NOISE_CHUNK)
        chunk = torch.randn(NOISE_CHUNK, *shape, generator=chunk_generator(seed, k))
        chunk = chunk[lo - k * NOISE_CHUNK : hi - k * NOISE_CHUNK]
        while len(chunk):
            take = min(batch - have, len(chunk))
            pending.append(chunk[:take])
            have, chunk = have + take, chunk[take:]
            if have == batch:
                yield torch.cat(pending)
                pending, have = [], 0
    if pending:
        yield torch.cat(pending)


def sample_noise(shape: tuple[int, ...], seed: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the noise :meth:`TrainedRun.sample` starts from, (stop - start,
    *shape) float32 (see :func:`iter_noise`)."""
    if stop <= start:
        return torch.zeros(0, *shape)
    return torch.cat(list(iter_noise(tuple(shape), seed, start, stop, stop - start)))
