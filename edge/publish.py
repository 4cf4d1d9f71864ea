"""The registry's admin API from the outside: publish an artifact or a weight-only update, read the fleet's state.

What a server, a script or `fedge registry publish/status` uses; it speaks the
wire contract (`fedge.v1.RegistryAdmin`) over gRPC, TLS when given a CA.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedge.edge.artifacts import WEIGHTS_FORMAT, sha256_hex
from fedge.edge.registry import TOKEN_HEADER
from fedge.edge.tls import open_channel
from fedge.edge.weights import changed_initializers, encode_weights
from fedge.protos import edge_pb2, edge_pb2_grpc

PUBLISH_CHUNK = 1 << 20


def publish(address: str, token: str, data: bytes, fmt: str = "onnx", metadata: dict[str, Any] | None = None,
            timeout: float = 60.0, root_certificates: Path | None = None) -> edge_pb2.PublishReply:
    """Publish an artifact through the registry's admin service (streamed, so size is not capped by gRPC)."""

    def chunks() -> Iterator[edge_pb2.PublishChunk]:
        yield edge_pb2.PublishChunk(format=fmt, metadata_json=json.dumps(metadata or {}, sort_keys=True),
                                    data=data[:PUBLISH_CHUNK])
        for i in range(PUBLISH_CHUNK, len(data), PUBLISH_CHUNK):
            yield edge_pb2.PublishChunk(data=data[i : i + PUBLISH_CHUNK])

    with open_channel(address, root_certificates) as channel:
        reply: edge_pb2.PublishReply = edge_pb2_grpc.RegistryAdminStub(channel).Publish(
            chunks(), timeout=timeout, metadata=((TOKEN_HEADER, token),))
    return reply


def publish_weight_update(address: str, token: str, base: bytes, base_version: int, new: bytes,
                          metadata: dict[str, Any] | None = None) -> edge_pb2.PublishReply:
    """Publish only the initializers that changed from `base` (served as `base_version`) to `new`."""
    payload = encode_weights(changed_initializers(base, new))
    meta = {**(metadata or {}), "base_version": base_version, "base_sha256": sha256_hex(base),
            "target_sha256": sha256_hex(new), "target_bytes": len(new)}
    return publish(address, token, payload, WEIGHTS_FORMAT, meta)


def fleet_status(address: str, timeout: float = 5.0, root_certificates: Path | None = None) -> edge_pb2.FleetStatusReply:
    """Every device the registry has seen: its profile, when, and its last telemetry."""
    with open_channel(address, root_certificates) as channel:
        reply: edge_pb2.FleetStatusReply = edge_pb2_grpc.RegistryAdminStub(channel).FleetStatus(
            edge_pb2.FleetStatusRequest(), timeout=timeout)
    return reply
