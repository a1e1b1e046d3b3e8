"""The subset of msgpack that flax writes (``flax.serialization.to_bytes`` and Orbax's aggregated
``checkpoint`` files of the authors' JAX code), decoded with numpy only: maps, arrays, strings,
numbers and flax's ndarray extension (chunked arrays joined back). No jax, flax or msgpack
package is needed. Read by :mod:`meanflow.runs.authors`."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ..errors import MeanFlowError, check

# ---------------------------------------------------------------------------------------------
# msgpack (the subset flax writes), numpy only


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        check(self.pos + n <= len(self.data), "the msgpack file is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def value(self) -> Any:
        b = self.uint(1)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self.take(b & 0x1F).decode("utf-8")
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            return self.take(self.uint(1 << (b - 0xC4)))
        if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32
            n = self.uint(1 << (b - 0xC7))
            return self._ext(struct.unpack(">b", self.take(1))[0], self.take(n))
        if b in (0xCA, 0xCB):
            return struct.unpack(">f" if b == 0xCA else ">d", self.take(4 if b == 0xCA else 8))[0]
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return int.from_bytes(self.take(n), "big", signed=True)
        if 0xD4 <= b <= 0xD8:  # fixext 1..16
            code = struct.unpack(">b", self.take(1))[0]
            return self._ext(code, self.take(1 << (b - 0xD4)))
        if b in (0xD9, 0xDA, 0xDB):
            return self.take(self.uint(1 << (b - 0xD9))).decode("utf-8")
        if b in (0xDC, 0xDD):
            return [self.value() for _ in range(self.uint(2 if b == 0xDC else 4))]
        if b in (0xDE, 0xDF):
            return self._map(self.uint(2 if b == 0xDE else 4))
        raise MeanFlowError(
            f"byte 0x{b:02x} at offset {self.pos - 1} is not msgpack; is this "
            "a flax msgpack checkpoint?"
        )

    def _map(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value()
            out[key.decode() if isinstance(key, bytes) else str(key)] = self.value()
        return out

    @staticmethod
    def _ext(code: int, payload: bytes) -> Any:
        if code in (1, 3):  # flax ndarray / numpy scalar
            shape, dtype, buffer = _Reader(payload).value()
            array = _ndarray(buffer, dtype.decode() if isinstance(dtype, bytes) else dtype)
            array = array.reshape(tuple(shape))
            return array if code == 1 else array[()]
        if code == 2:  # complex
            real, imag = _Reader(payload).value()
            return complex(real, imag)
        raise MeanFlowError(f"unknown msgpack extension type {code}; not a flax checkpoint")


def _ndarray(buffer: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into float32
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    try:
        return np.frombuffer(buffer, dtype=np.dtype(dtype))
    except TypeError:
        raise MeanFlowError(f"array dtype {dtype!r} in the checkpoint is not supported") from None


def _unchunk(tree: Any) -> Any:
    """flax stores arrays over 2**30 bytes as {'__msgpack_chunked_array__', 'shape', 'chunks'}."""
    if isinstance(tree, dict):
        if "__msgpack_chunked_array__" in tree:
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str) -> Any:
    """The tree of a flax msgpack file (``flax.serialization.msgpack_restore`` without flax)."""
    with open(path, "rb") as f:
        data = f.read()
    reader = _Reader(data)
    tree = reader.value()
    check(
        reader.pos == len(data),
        f"{path!r} has {len(data) - reader.pos} bytes after the "
        "msgpack value; is it a flax msgpack checkpoint?",
    )
    return _unchunk(tree)


# ---------------------------------------------------------------------------------------------
# locating the authors' files
