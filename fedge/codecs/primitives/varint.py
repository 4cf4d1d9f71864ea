"""LEB128 varints, vectorised: small counts cost one byte, so model tables stay small."""

from __future__ import annotations

import numpy as np

from fedge.codecs.base import CodecError

_MAX_GROUPS = 10  # a uint64 needs at most ten 7-bit groups


def encode_varints(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    shifts = (7 * np.arange(_MAX_GROUPS, dtype=np.uint64))[None, :]
    groups = (v[:, None] >> shifts) & np.uint64(0x7F)
    # number of groups: index of the highest non-zero group, plus one (at least one)
    nonzero = groups != 0
    length = np.where(nonzero.any(axis=1), _MAX_GROUPS - np.argmax(nonzero[:, ::-1], axis=1), 1)
    col = np.arange(_MAX_GROUPS)[None, :]
    cont = (col < (length[:, None] - 1)).astype(np.uint64) << np.uint64(7)
    return (groups | cont).astype(np.uint8)[col < length[:, None]].tobytes()


def decode_varints(data: bytes | memoryview, count: int) -> tuple[np.ndarray, int]:
    """The first `count` varints of `data` and the number of bytes they took."""
    if count == 0:
        return np.zeros(0, np.uint64), 0
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size < count:
        raise CodecError("varint table truncated")
    ends = ends[:count]
    used = int(ends[-1]) + 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    if (ends - starts >= _MAX_GROUPS).any():
        raise CodecError("varint longer than 64 bits")
    body = raw[:used].astype(np.uint64) & np.uint64(0x7F)
    position = np.arange(used) - np.repeat(starts, ends - starts + 1)
    shifted = body << (np.uint64(7) * position.astype(np.uint64))
    return np.add.reduceat(shifted, starts), used
