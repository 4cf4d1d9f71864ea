"""Deploy a model to a fleet of edge agents on this machine: export, registry, K agents, publish, wait, measure.

The registry and the agents are separate processes (`python -m fedge.server.registry`,
`python -m fedge.edge.agent`) reached over real gRPC on loopback, so this core
module imports neither role: it launches processes and speaks the wire contract.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from torch import nn
from torch.utils.data import TensorDataset

from fedge.artifacts import WEIGHTS_FORMAT, sha256_hex
from fedge.grpc_tls import open_channel
from fedge.onnx_export import export_model
from fedge.onnx_weights import changed_initializers, encode_weights
from fedge.protos import edge_pb2, edge_pb2_grpc

TOKEN_HEADER = "x-fedge-token"
PUBLISH_CHUNK = 1 << 20


class DeployError(RuntimeError):
    """A process did not start, or the fleet did not reach the new version in time."""


# ---- speaking to a registry -------------------------------------------------------------------------


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
    with open_channel(address, root_certificates) as channel:
        reply: edge_pb2.FleetStatusReply = edge_pb2_grpc.RegistryAdminStub(channel).FleetStatus(
            edge_pb2.FleetStatusRequest(), timeout=timeout)
    return reply


# ---- processes -------------------------------------------------------------------------------------------


@dataclass
class Process:
    """A child process whose stdout is drained by a thread (so it never blocks) and kept for errors."""

    name: str
    popen: subprocess.Popen[str]
    lines: list[str]

    @classmethod
    def launch(cls, name: str, args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Process:
        popen = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        proc = cls(name, popen, [])
        threading.Thread(target=proc._drain, args=(popen.stdout, log), daemon=True).start()
        return proc

    def _drain(self, stream: IO[str] | None, log: Path | None) -> None:
        if stream is None:
            return
        with open(log if log else os.devnull, "a") as sink:
            for line in stream:
                self.lines.append(line.rstrip("\n"))
                sink.write(line)
                sink.flush()

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        tail = "\n".join(self.lines[-20:])
        raise DeployError(f"{self.name} did not print {prefix!r} within {timeout:.0f}s (exit {self.popen.poll()}):\n{tail}")

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def start_registry(workdir: Path, token: str, timeout: float = 30.0) -> tuple[Process, str, Path]:
    """Launch `python -m fedge.server.registry` on a free loopback port; returns (process, address, public key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = Process.launch("registry", ["-m", "fedge.server.registry", "--workdir", str(workdir), "--port", "0"],
                          env={"FEDGE_PUBLISH_TOKEN": token}, log=workdir / "registry.log")
    address = proc.wait_for_line("REGISTRY ", timeout)
    public_key = Path(proc.wait_for_line("PUBLIC_KEY ", timeout))
    return proc, address, public_key


def start_agent(address: str, device_id: str, public_key: Path, workdir: Path, data: Path | None = None,
                tier: str = "mid", extra: list[str] | None = None) -> Process:
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["-m", "fedge.edge.agent", "--registry", address, "--device-id", device_id, "--public-key", str(public_key),
            "--workdir", str(workdir), "--tier", tier, "--report-interval", "0.3", *(extra or [])]
    if data is not None:
        args += ["--data", str(data)]
    return Process.launch(device_id, args, log=workdir / "agent.log")


def wait_for_fleet(address: str, version: int, devices: list[str], min_predictions: dict[str, int] | None = None,
                   timeout: float = 60.0) -> dict[str, edge_pb2.Telemetry]:
    """Poll the registry until every device reports serving `version` (and enough predictions on it)."""
    deadline = time.monotonic() + timeout
    latest: dict[str, edge_pb2.Telemetry] = {}
    while time.monotonic() < deadline:
        try:
            status = fleet_status(address)
        except grpc.RpcError:
            time.sleep(0.2)
            continue
        latest = {d.profile.device_id: d.last_telemetry for d in status.devices if d.HasField("last_telemetry")}
        ready = [
            d for d in devices
            if d in latest and latest[d].serving_version == version
            and latest[d].num_predictions >= (min_predictions or {}).get(d, 0)
        ]
        if len(ready) == len(devices):
            return latest
        time.sleep(0.2)
    raise DeployError(f"after {timeout:.0f}s not all devices serve v{version}: "
                      f"{ {d: (t.serving_version, t.num_predictions) for d, t in latest.items()} }")


# ---- the whole deployment ------------------------------------------------------------------------------


def _shards(data: TensorDataset, devices: int) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = (t.numpy() for t in data.tensors[:2])
    if len(x) >= 2 * devices:
        return list(zip(np.array_split(x.astype(np.float32), devices), np.array_split(y.astype(np.int64), devices)))
    return [(x.astype(np.float32), y.astype(np.int64))] * devices


def deploy_to_edge(model: nn.Module, test_data: TensorDataset, devices: int, workdir: str | Path,
                   timeout_s: float = 90.0) -> dict[str, Any]:
    """Export `model`, publish it to a registry, and wait until `devices` edge agents serve it.

    Each agent serves its shard of `test_data` (labelled) once, request by
    request, so the returned accuracy and p50 latency (batch 1) come from the
    devices' own telemetry.
    """
    if devices < 1:
        raise ValueError("devices must be >= 1")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x_all, y_all = test_data.tensors[0], test_data.tensors[1]
    # INT8 calibrates on the inputs the fleet will see (no labels), as a device-side calibration would.
    result = export_model(model, x_all, y_all, calibration_x=x_all)
    token = secrets.token_hex(16)
    registry, address, public_key = start_registry(workdir / "registry", token)
    agents: list[Process] = []
    try:
        names, sizes = [], {}
        for i, (x, y) in enumerate(_shards(test_data, devices)):
            name = f"edge-{i}"
            data_path = workdir / "agents" / name / "data.npz"
            data_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(data_path, x=x, y=y)
            tier = ("strong", "mid", "weak")[i % 3]
            agents.append(start_agent(address, name, public_key, workdir / "agents" / name, data_path, tier,
                                      extra=["--serve-passes", "1"]))  # telemetry covers each sample once
            names.append(name)
            sizes[name] = len(x)
        reply = publish(address, token, result.fp32, "onnx", result.metadata)
        telemetry = wait_for_fleet(address, reply.version, names, sizes, timeout_s)
    finally:
        for proc in agents:
            proc.stop()
        registry.stop()
    deployed = sum(1 for t in telemetry.values() if t.serving_version == reply.version)
    runtimes = sorted({t.runtime for t in telemetry.values()})
    labelled = [(t.accuracy, t.num_predictions) for t in telemetry.values() if t.HasField("accuracy")]
    meta = result.metadata
    return {
        "devices": devices,
        "deployed": deployed,
        "runtime": ",".join(runtimes),
        "artifact": {"format": "onnx", "bytes": reply.bytes, "sha256": reply.sha256,
                     "max_abs_diff_vs_torch": float(meta["max_abs_diff_vs_torch"])},
        "int8": {"bytes": int(meta["int8_bytes"]), "accuracy": float(meta["int8_accuracy"])},
        "p50_latency_ms": float(np.median([t.latency_p50_ms for t in telemetry.values()])),
        "accuracy": float(sum(a * n for a, n in labelled) / max(sum(n for _, n in labelled), 1)),
    }
