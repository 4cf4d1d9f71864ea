"""Chunked download of an artifact with resume: bytes already on disk are never fetched twice.

A download of one format of a version goes to `DOWNLOADS/<sha256>.partial` and
each attempt asks the registry to stream from that file's size, so a cut link or
a killed agent resumes where it stopped. Only a complete file whose size and
sha256 match the signed manifest is returned.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc

from fedge.edge.artifacts import ArtifactError, Manifest, verify_file
from fedge.protos import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)


class DownloadIncomplete(Exception):
    """The link failed before the whole artifact arrived; the partial file stays for the next attempt."""


class Fetcher:
    """Downloads announced artifacts from the registry for one device."""

    def __init__(self, stub: edge_pb2_grpc.EdgeRegistryStub, device_id: str, folder: Path, *, chunk_size: int,
                 chunk_delay_s: float, max_attempts: int, stop: threading.Event) -> None:
        self.stub = stub
        self.device_id = device_id
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.chunk_delay_s = chunk_delay_s  # throttle (a slow link, for tests and demos)
        self.max_attempts = max_attempts
        self._stop = stop
        self.fetched: dict[int, int] = {}  # bytes received per version, every format and attempt (what the link carried)

    def download(self, manifest: Manifest, fmt: str) -> bytes:
        """Fetch format `fmt` of the version in chunks into `<sha256>.partial`, resuming from its size; retry on a
        cut stream."""
        entry = manifest.formats[fmt]
        partial = self.folder / f"{entry.sha256}.partial"
        for attempt in range(1, self.max_attempts + 1):
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > entry.bytes:
                partial.unlink()
                offset = 0
            if offset == entry.bytes:
                break
            request = edge_pb2.FetchRequest(device_id=self.device_id, version=manifest.version, offset=offset,
                                            chunk_size=self.chunk_size, format=fmt)
            try:
                with open(partial, "ab") as fh:
                    for chunk in self.stub.FetchArtifact(request, timeout=120):
                        if chunk.offset != offset:
                            raise ArtifactError(f"chunk at offset {chunk.offset}, expected {offset}")
                        fh.write(chunk.data)
                        fh.flush()
                        offset += len(chunk.data)
                        self.fetched[manifest.version] = self.fetched.get(manifest.version, 0) + len(chunk.data)
                        if self._stop.is_set():
                            raise ArtifactError("agent stopping")
                        if self.chunk_delay_s:
                            time.sleep(self.chunk_delay_s)
            except grpc.RpcError as err:
                log.warning("%s: fetch v%d %s cut at %d bytes (attempt %d): %s", self.device_id, manifest.version, fmt,
                            offset, attempt, err.code() if hasattr(err, "code") else err)
                time.sleep(min(0.2 * attempt, 2.0))
        held = partial.stat().st_size if partial.exists() else 0
        if held < entry.bytes:
            raise DownloadIncomplete(f"{fmt}: {held} of {entry.bytes} bytes after {self.max_attempts} attempts")
        data = partial.read_bytes()
        partial.unlink()  # verified or not, a complete partial has done its job; a bad one must not poison a retry
        verify_file(data, manifest, fmt)
        return data
