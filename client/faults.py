"""Fault drills: deliberately damaged uploads, so operators can watch the server refuse them.

Enabled per run (`fault-partitions`, `fault-kind`); off by default. The ClientApp
damages the envelope of a drilled node's reply after the method built it, so
every compressed method can be drilled and the node's own state (its residual)
is what it would be after a bad link.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from fedge.codecs import build_codec
from fedge.envelope import pack, peek
from fedge.messages import UPDATE_RECORD, envelope_bytes, envelope_record
from fedge.protos import envelope_pb2
from fedge.settings import RunSettings

FAULT_KINDS = ("truncate", "corrupt", "version", "shape", "nan", "oversize")


def damage(envelope: bytes, kind: str) -> bytes:
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
        # A well-formed dense envelope of the same tensors whose values are NaN: only the receiver's finiteness
        # check stops it.
        specs = peek(envelope, len(envelope)).specs
        dense = build_codec("dense")
        encoded = dense.encode({s.name: np.full(s.shape, np.nan, dtype=s.dtype) for s in specs})
        return pack(dense, encoded.payload, encoded.specs)
    if kind == "oversize":
        return envelope + bytes(128 << 20)
    raise ValueError(f"unknown fault kind {kind!r}; known: {FAULT_KINDS}")


def drilled(settings: RunSettings, partition_id: int) -> bool:
    return partition_id in {int(p) for p in settings.fault_partitions.split(",") if p.strip()}


def damage_reply(reply: Message, settings: RunSettings, partition_id: int) -> Message:
    """The reply, with its update envelope damaged if this node is drilled (replies without one pass)."""
    if not drilled(settings, partition_id) or UPDATE_RECORD not in reply.content.array_records:
        return reply
    reply.content[UPDATE_RECORD] = envelope_record(damage(envelope_bytes(reply.content, UPDATE_RECORD),
                                                          settings.fault_kind))
    return reply
