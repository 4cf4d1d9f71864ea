"""Length-prefixed sections: how a codec lays its streams out in one payload.

Every section is a little-endian uint32 length followed by that many bytes,
so a reader can check each boundary, and the writer can account for every byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from fedge.codecs.base import CodecError, Section

_LEN = struct.Struct("<I")


class PayloadWriter:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.sections: list[Section] = []

    def add(self, name: str, data: bytes | np.ndarray, *, entropy_coded: bool = False,
            bound: Callable[[], float] | None = None) -> None:
        """Append a section; a raw section's bound is its own size, framing excluded."""
        blob = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        self._parts.append(_LEN.pack(len(blob)))
        self._parts.append(blob)
        size = len(blob)
        self.sections.append(Section(name, _LEN.size + size, entropy_coded,
                                     bound if bound is not None else (lambda: float(size))))

    def payload(self) -> bytes:
        return b"".join(self._parts)


class PayloadReader:
    def __init__(self, payload: bytes) -> None:
        self._buf = memoryview(payload)
        self._pos = 0

    def take(self, name: str) -> memoryview:
        if self._pos + _LEN.size > len(self._buf):
            raise CodecError(f"payload truncated before section {name!r}")
        (size,) = _LEN.unpack_from(self._buf, self._pos)
        start = self._pos + _LEN.size
        if start + size > len(self._buf):
            raise CodecError(f"payload truncated inside section {name!r} ({size} bytes announced, "
                             f"{len(self._buf) - start} left)")
        self._pos = start + size
        return self._buf[start:self._pos]

    def array(self, name: str, dtype: str, count: int | None = None) -> np.ndarray:
        """The next section read as a little-endian array, optionally of a known element count."""
        return self.as_array(self.take(name), name, dtype, count)

    @staticmethod
    def as_array(view: memoryview, name: str, dtype: str, count: int | None = None) -> np.ndarray:
        item = np.dtype(dtype).itemsize
        if len(view) % item:
            raise CodecError(f"section {name!r} has {len(view)} bytes, not a multiple of {item}")
        arr = np.frombuffer(view, dtype=dtype)
        if count is not None and arr.size != count:
            raise CodecError(f"section {name!r} holds {arr.size} values, expected {count}")
        return arr

    def finish(self) -> None:
        if self._pos != len(self._buf):
            raise CodecError(f"payload has {len(self._buf) - self._pos} trailing bytes")
