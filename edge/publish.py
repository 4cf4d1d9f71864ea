"""The registry's admin API from the outside: publish a version or a weight-only update, read the fleet's state.

What a server, a script or `fedge registry publish/status` uses; it speaks the
wire contract (`fedge.v1.RegistryAdmin`) over gRPC, TLS when given a CA.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedge.edge.artifacts import REFERENCE, WEIGHTS_KIND, BundleFile, sha256_hex
from fedge.edge.registry import TOKEN_HEADER
from fedge.edge.tls import open_channel
from fedge.edge.weights import apply_initializers, changed_initializers, encode_weights
from fedge.protos import edge_pb2, edge_pb2_grpc

PUBLISH_CHUNK = 1 << 20


def publish(address: str, token: str, formats: Mapping[str, BundleFile], metadata: dict[str, Any] | None = None,
            timeout: float = 60.0, root_certificates: Path | None = None) -> edge_pb2.PublishReply:
    """Publish one version made of `formats` (streamed, so size is not capped by gRPC's message limit)."""

    def chunks() -> Iterator[edge_pb2.PublishChunk]:
        first = True
        for name, f in formats.items():
            yield edge_pb2.PublishChunk(
                format=name, kind=f.kind, precision=f.precision, data=f.data[:PUBLISH_CHUNK],
                format_metadata_json=json.dumps(f.metadata, sort_keys=True),
                metadata_json=json.dumps(metadata or {}, sort_keys=True) if first else "")
            first = False
            for i in range(PUBLISH_CHUNK, len(f.data), PUBLISH_CHUNK):
                yield edge_pb2.PublishChunk(data=f.data[i : i + PUBLISH_CHUNK])

    with open_channel(address, root_certificates) as channel:
        reply: edge_pb2.PublishReply = edge_pb2_grpc.RegistryAdminStub(channel).Publish(
            chunks(), timeout=timeout, metadata=((TOKEN_HEADER, token),))
    return reply


def weight_update(base: bytes, base_version: int, new: bytes, precision: str = "fp32") -> BundleFile:
    """The initializers that changed from `base` (a format served as `base_version`) to `new`, as one format.

    The signed target is `base` with those initializers replaced: the model `new` is, in the base's
    initializer order (a quantizer need not keep one order between two runs).
    """
    changes = changed_initializers(base, new)
    target = apply_initializers(base, changes)
    meta = {"base_version": base_version, "base_sha256": sha256_hex(base), "target_sha256": sha256_hex(target),
            "target_bytes": len(target)}
    return BundleFile(encode_weights(changes), WEIGHTS_KIND, precision, meta)


def publish_weight_update(address: str, token: str, base: bytes, base_version: int, new: bytes,
                          reference: bytes | None = None, metadata: dict[str, Any] | None = None) -> edge_pb2.PublishReply:
    """Publish an fp32 weight-only update against `base_version`, with the new model's reference set if given
    (a device serving another precision has no fp32 of its own to compare the update with)."""
    formats = {"fp32": weight_update(base, base_version, new)}
    if reference is not None:
        formats[REFERENCE] = BundleFile(reference, "reference", "")
    return publish(address, token, formats, metadata)


def fleet_status(address: str, timeout: float = 5.0, root_certificates: Path | None = None) -> edge_pb2.FleetStatusReply:
    """Every device the registry has seen: its profile, when, its last telemetry and deployment events."""
    with open_channel(address, root_certificates) as channel:
        reply: edge_pb2.FleetStatusReply = edge_pb2_grpc.RegistryAdminStub(channel).FleetStatus(
            edge_pb2.FleetStatusRequest(), timeout=timeout)
    return reply
