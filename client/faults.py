"""Fault drills: deliberately damaged uploads, so operators can watch the server refuse them.

Enabled per run (`fault-partitions`, `fault-kind`); off by default.
"""

from __future__ import annotations

import numpy as np

from fedge.codecs.registry import build_codec
from fedge.envelope import pack
from fedge.protos import envelope_pb2

FAULT_KINDS = ("truncate", "corrupt", "version", "shape", "nan", "oversize")


def damage(envelope: bytes, kind: str, update: dict[str, np.ndarray]) -> bytes:
    """Return a damaged copy of `envelope` of the given kind."""
    if kind == "truncate":
        return envelope[: len(envelope) // 2]
    if kind == "corrupt":
        msg = envelope_pb2.UpdateEnvelope.FromString(envelope)
        payload = bytearray(msg.payload)
        payload[len(payload) // 2] ^= 0xFF
        msg.payload = bytes(payload)  # checksum left stale, as a bit flip on a bad link would
        return msg.SerializeToString()
    if kind == "version":
        msg = envelope_pb2.UpdateEnvelope.FromString(envelope)
        msg.codec_version += 1
        return msg.SerializeToString()
    if kind == "shape":
        msg = envelope_pb2.UpdateEnvelope.FromString(envelope)
        msg.tensors[0].shape[0] += 1
        return msg.SerializeToString()
    if kind == "nan":
        # A well-formed dense envelope whose values are NaN: only the receiver's finiteness check stops it.
        dense = build_codec("dense")
        encoded = dense.encode({k: np.full_like(v, np.nan) for k, v in update.items()})
        return pack(dense, encoded.payload, encoded.specs)
    if kind == "oversize":
        return envelope + bytes(128 << 20)
    raise ValueError(f"unknown fault kind {kind!r}; known: {FAULT_KINDS}")
