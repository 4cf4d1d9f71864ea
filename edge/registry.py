"""The model registry: signed, versioned artifacts on disk, pushed to watching edge agents over gRPC.

`fedge registry serve --workdir DIR [--port 0]` prints `PUBLIC_KEY <path>` and
`REGISTRY <host:port>` once it listens, so a launcher can read the bound port.
A version is a bundle of formats under one signed manifest; each version lives in
`DIR/artifacts/v000001/` (`fedge.edge.artifacts.ArtifactStore`);
telemetry and uploaded samples are stored under `DIR/telemetry.jsonl` and `DIR/samples/`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from fedge.edge.artifacts import (
    ArtifactError,
    ArtifactStore,
    BundleFile,
    StoredArtifact,
    load_or_create_key,
    make_manifest,
    public_pem,
    read_bundle,
    sha256_hex,
    sign_manifest,
)
from fedge.edge.tls import add_port
from fedge.protos import edge_pb2, edge_pb2_grpc

log = logging.getLogger("fedge.registry")

DEFAULT_CHUNK = 256 * 1024
MAX_CHUNK = 2 * 1024 * 1024
#: gRPC metadata key of the publish token (`fedge.edge.publish` sends it, `Registry.Publish` checks it)
TOKEN_HEADER = "x-fedge-token"
#: deployment events kept per device for `FleetStatus` (all of them go to telemetry.jsonl)
RECENT_EVENTS = 20


class Registry(edge_pb2_grpc.EdgeRegistryServicer, edge_pb2_grpc.RegistryAdminServicer):
    """Holds artifacts and fleet state; publishes to watchers. Thread-safe: gRPC calls run in a pool."""

    def __init__(self, workdir: Path, key_path: Path | None = None, publish_token: str = "") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_key(key_path or self.workdir / "registry.pem")
        self.public_key_pem = public_pem(self.key.public_key())
        self.publish_token = publish_token
        self.store = ArtifactStore(self.workdir / "artifacts")
        self._cond = threading.Condition()
        versions = self.store.versions()
        self._latest: StoredArtifact | None = self.store.read(versions[-1]) if versions else None
        self._devices: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        #: (device_id, version, format, offset) of every fetch, so resumption is observable.
        self.fetch_log: list[tuple[str, int, str, int]] = []
        (self.workdir / "samples").mkdir(exist_ok=True)

    # ---- publishing --------------------------------------------------------------------

    @property
    def latest_version(self) -> int:
        return self._latest.manifest.version if self._latest else 0

    def publish(self, formats: dict[str, BundleFile], metadata: dict[str, Any] | None = None) -> int:
        """Store, sign and announce a new version made of `formats` (e.g. fp32, int8, fp16, reference); its number.

        Raises ValueError for a bundle every agent would refuse.
        """
        with self._cond:
            version = self.latest_version + 1
            try:
                manifest = make_manifest(version, formats, metadata)
            except ArtifactError as err:
                raise ValueError(str(err)) from err
            canonical, signature = sign_manifest(manifest, self.key)
            self._latest = self.store.write(manifest, canonical, signature, {n: f.data for n, f in formats.items()})
            self._cond.notify_all()
        log.info("published v%d (%s; %d bytes)", version, ", ".join(f"{n} {f.bytes}" for n, f in manifest.formats.items()),
                 manifest.total_bytes)
        return version

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    # ---- EdgeRegistry ----------------------------------------------------------------------

    def Register(self, request: edge_pb2.DeviceProfile, context: grpc.ServicerContext) -> edge_pb2.RegisterReply:
        if not request.device_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device_id is required")
        with self._lock:
            entry = self._devices.setdefault(request.device_id, {})
            entry["profile"] = edge_pb2.DeviceProfile.FromString(request.SerializeToString())
            entry["last_seen"] = time.time()
        log.info("registered %s (%s, %s, takes %s)", request.device_id, request.tier, request.runtime,
                 ",".join(request.precisions))
        return edge_pb2.RegisterReply(accepted=True, latest_version=self.latest_version, message="registered")

    def WatchDeployments(self, request: edge_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[edge_pb2.DeploymentNotice]:
        sent = request.known_version
        while context.is_active() and not self._stopping.is_set():
            with self._cond:
                if self.latest_version <= sent:
                    self._cond.wait(timeout=0.5)
                latest = self._latest
            if latest is not None and latest.manifest.version > sent:
                sent = latest.manifest.version
                yield edge_pb2.DeploymentNotice(version=sent, manifest=latest.canonical, signature=latest.signature)

    def FetchArtifact(self, request: edge_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[edge_pb2.ArtifactChunk]:
        if request.version not in self.store.versions():
            context.abort(grpc.StatusCode.NOT_FOUND, f"no artifact version {request.version}")
        published = self.store.read(request.version)
        if request.format not in published.manifest.formats:
            context.abort(grpc.StatusCode.NOT_FOUND, f"v{request.version} has no format {request.format!r}; "
                                                     f"it has {', '.join(sorted(published.manifest.formats))}")
        total = published.manifest.formats[request.format].bytes
        if not 0 <= request.offset <= total:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside [0, {total}]")
        with self._lock:
            self.fetch_log.append((request.device_id, request.version, request.format, int(request.offset)))
        chunk = min(request.chunk_size or DEFAULT_CHUNK, MAX_CHUNK)
        with open(published.path(request.format), "rb") as fh:
            fh.seek(request.offset)
            offset = request.offset
            while offset < total and context.is_active():
                data = fh.read(chunk)
                if not data:
                    break
                yield edge_pb2.ArtifactChunk(version=request.version, offset=offset, data=data, total_bytes=total)
                offset += len(data)

    def ReportTelemetry(self, request: edge_pb2.Telemetry, context: grpc.ServicerContext) -> edge_pb2.TelemetryAck:
        record = MessageToDict(request, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        with self._lock:
            entry = self._devices.setdefault(request.device_id, {})
            entry["telemetry"] = request
            entry["last_seen"] = time.time()
            entry["events"] = [*entry.get("events", []), *request.events][-RECENT_EVENTS:]
            with open(self.workdir / "telemetry.jsonl", "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        return edge_pb2.TelemetryAck(stored=True)

    def UploadSamples(self, request: edge_pb2.SampleBatch, context: grpc.ServicerContext) -> edge_pb2.UploadAck:
        if not request.samples:
            return edge_pb2.UploadAck(stored=0)
        arrays: dict[str, np.ndarray] = {}
        try:
            for i, s in enumerate(request.samples):
                arrays[f"x{i}"] = np.frombuffer(s.tensor, dtype=np.dtype(s.dtype)).reshape(tuple(s.shape))
                arrays[f"p{i}"] = np.asarray(s.probabilities, dtype=np.float32)
                arrays[f"e{i}"] = np.asarray(s.entropy, dtype=np.float64)
                if s.HasField("label"):
                    arrays[f"y{i}"] = np.asarray(s.label, dtype=np.int64)
        except (TypeError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed sample: {err}")
        device_dir = self.workdir / "samples" / _safe_name(request.device_id)
        device_dir.mkdir(parents=True, exist_ok=True)
        name = f"v{request.serving_version:06d}-{time.time_ns()}.npz"
        np.savez(device_dir / name, **arrays)  # type: ignore[arg-type]
        return edge_pb2.UploadAck(stored=len(request.samples))

    # ---- RegistryAdmin -------------------------------------------------------------------------

    def _authorised(self, context: grpc.ServicerContext) -> bool:
        """Publishing over gRPC needs a configured token; with none, only in-process `publish` works."""
        given = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        return bool(self.publish_token) and hmac.compare_digest(str(given), self.publish_token)

    def Publish(self, request_iterator: Iterator[edge_pb2.PublishChunk], context: grpc.ServicerContext) -> edge_pb2.PublishReply:
        if not self._authorised(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "bad or missing publish token")
        try:
            formats, metadata = _read_bundle(request_iterator)
            version = self.publish(formats, metadata)
        except ValueError as err:  # json.JSONDecodeError included
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        stored = self.store.read(version)
        return edge_pb2.PublishReply(
            version=version, sha256=sha256_hex(stored.canonical), bytes=stored.manifest.total_bytes,
            formats=[edge_pb2.PublishedFormat(format=n, sha256=f.sha256, bytes=f.bytes)
                     for n, f in stored.manifest.formats.items()])

    def FleetStatus(self, request: edge_pb2.FleetStatusRequest, context: grpc.ServicerContext) -> edge_pb2.FleetStatusReply:
        reply = edge_pb2.FleetStatusReply(latest_version=self.latest_version)
        with self._lock:
            for device_id, entry in sorted(self._devices.items()):
                status = reply.devices.add(last_seen_unix=entry.get("last_seen", 0.0))
                status.profile.CopyFrom(entry.get("profile") or edge_pb2.DeviceProfile(device_id=device_id))
                status.profile.ClearField("serving_version")  # as registered; the telemetry says what it serves now
                if "telemetry" in entry:
                    status.last_telemetry.CopyFrom(entry["telemetry"])
                    status.last_telemetry.ClearField("events")  # the device's events are in recent_events
                status.recent_events.extend(entry.get("events", []))
        return reply


def _read_bundle(chunks: Iterator[edge_pb2.PublishChunk]) -> tuple[dict[str, BundleFile], dict[str, Any]]:
    """The formats and metadata of a streamed publish (each format's first chunk names it)."""
    metadata: dict[str, Any] = {}
    heads: dict[str, edge_pb2.PublishChunk] = {}
    parts: dict[str, list[bytes]] = {}
    current = ""
    for i, chunk in enumerate(chunks):
        if i == 0 and chunk.metadata_json:
            metadata = json.loads(chunk.metadata_json)
        if chunk.format:
            if chunk.format in heads:
                raise ValueError(f"format {chunk.format!r} sent twice")
            current = chunk.format
            heads[current], parts[current] = chunk, []
        elif not current:
            raise ValueError("the first chunk must name its format")
        parts[current].append(chunk.data)
    return {name: BundleFile(b"".join(parts[name]), head.kind or "onnx", head.precision,
                             json.loads(head.format_metadata_json) if head.format_metadata_json else {})
            for name, head in heads.items()}, metadata


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "unknown"


def start(registry: Registry, host: str = "127.0.0.1", port: int = 0, workers: int = 32,
          tls_certificate: Path | None = None, tls_key: Path | None = None) -> tuple[grpc.Server, int]:
    """Start serving in background threads; returns the server and the bound port (port 0 picks a free one).

    With a certificate and key the port serves TLS only.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="registry"))
    edge_pb2_grpc.add_EdgeRegistryServicer_to_server(registry, server)
    edge_pb2_grpc.add_RegistryAdminServicer_to_server(registry, server)
    bound = add_port(server, f"{host}:{port}", tls_certificate, tls_key)
    if bound == 0:
        raise RuntimeError(f"could not bind the registry to {host}:{port}")
    server.start()
    return server, bound


def serve(workdir: str | Path, host: str = "127.0.0.1", port: int = 0, key_path: str | Path | None = None,
          publish_token: str | None = None, publish: str | Path | None = None, workers: int = 64,
          tls_certificate: Path | None = None, tls_key: Path | None = None) -> None:
    """Run a registry until SIGINT/SIGTERM (`fedge registry serve`).

    The publish token comes from the argument or `FEDGE_PUBLISH_TOKEN`; an
    optional `publish` (an fp32 ONNX file, or a `fedge export` folder) is published at start-up as the first version.
    Each watching agent holds one of `workers` threads while connected.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s registry %(message)s")  # no-op if set up
    token = publish_token if publish_token is not None else os.environ.get("FEDGE_PUBLISH_TOKEN", "")
    registry = Registry(Path(workdir), Path(key_path) if key_path else None, token)
    if publish:
        formats, metadata = read_bundle(Path(publish))
        registry.publish(formats, metadata)
    public_path = registry.workdir / "registry.pub.pem"
    public_path.write_bytes(registry.public_key_pem)
    server, bound = start(registry, host, port, workers, tls_certificate, tls_key)
    print(f"PUBLIC_KEY {public_path}", flush=True)
    print(f"REGISTRY {host}:{bound}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    registry.stop()
    server.stop(grace=1.0).wait()
