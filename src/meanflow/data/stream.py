"""Batches read from disk while the step runs: a ``DataLoader`` with worker processes.

The data order is :func:`permutation` per epoch, exactly as the in-memory
:class:`~meanflow.train.batches.Batches`, so a streamed run and an in-memory run of the same
data see the same rows in the same steps. The sampler yields, for each global batch, the index
list of this process's rows; a worker reads them in one call (``dataset.batch(indices)``, e.g.
a gather of rows from latent shards) and the loader pins them for the copy to the GPU.
The position ``(epoch, index)`` counts the batches the *loop* consumed, not those the workers
prefetched, so a checkpoint resumes exactly; on resume the sampler starts from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation of ``range(n)`` seeded by ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class BatchReader(Protocol):
    """What a streamed data set provides: its size and a batch of rows by index."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class _ByIndexList(Dataset):
    def __init__(self, reader: BatchReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, indices: list[int]):
        x, y = self.reader.batch(np.asarray(indices, dtype=np.int64))
        return (x,) if y is None else (x, y)


class RankSampler(Sampler):
    """Index lists of this process's rows (``part`` of each global batch of ``batch_size``),
    batch after batch from position ``start`` (global batches already consumed), forever."""

    def __init__(self, n: int, batch_size: int, seed: int, part: slice, start: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.part, self.start = n, batch_size, seed, part, start

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.batch_size
        count, epoch = self.start, -1
        perm: torch.Tensor | None = None
        while True:
            e, k = divmod(count, per_epoch)
            if e != epoch:
                epoch, perm = e, permutation(self.n, self.seed, e)
            assert perm is not None  # drawn on the first pass (epoch starts at -1)
            yield perm[k * self.batch_size : (k + 1) * self.batch_size][self.part].tolist()
            count += 1


class StreamedBatches:
    """The interface of :class:`~meanflow.train.batches.Batches` over a :class:`BatchReader`."""

    def __init__(
        self,
        reader: BatchReader,
        batch_size: int,
        seed: int,
        part: slice = slice(None),
        workers: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        self.reader, self.batch_size, self.seed, self.part = reader, batch_size, seed, part
        self.workers, self.device = workers, torch.device(device)
        self.consumed = 0
        self._iter: Iterator[Any] | None = None
        self._loader: DataLoader | None = None

    @property
    def per_epoch(self) -> int:
        return len(self.reader) // self.batch_size

    def _start(self) -> None:
        sampler = RankSampler(
            len(self.reader), self.batch_size, self.seed, self.part, self.consumed
        )
        self._loader = DataLoader(
            _ByIndexList(self.reader),
            batch_size=None,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
            # its own generator: starting an iterator draws a seed, which
            # must not advance the global RNG (the dropout masks)
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._iter = iter(self._loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._iter is None:
            self._start()
            assert self._iter is not None  # set by _start()
        item = next(self._iter)
        self.consumed += 1
        x = item[0].to(self.device, non_blocking=True)
        y = item[1].to(self.device, non_blocking=True) if len(item) > 1 else None
        return x, y

    def state(self) -> dict[str, int]:
        epoch, k = divmod(self.consumed, self.per_epoch)
        return {"epoch": epoch, "index": k * self.batch_size}

    def load_state(self, state: dict[str, int]) -> None:
        self.close()
        self.consumed = (
            int(state["epoch"]) * self.per_epoch + int(state["index"]) // self.batch_size
        )

    def close(self) -> None:
        """Stop the worker processes (a new iterator starts at the next :meth:`next`)."""
        self._iter, self._loader = None, None


class TensorReader:
    """A :class:`BatchReader` over tensors already in memory (tests, and data that fits)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.from_numpy(indices)
        return self.x[idx], None if self.labels is None else self.labels[idx]
