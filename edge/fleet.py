"""A fleet of edge agents on this machine: a registry and K agents as separate processes, deploy, wait, measure.

The registry and the agents are launched through the command line
(`fedge registry serve`, `fedge edge agent`) and reached over real gRPC on
loopback, exactly as on separate machines; `deploy_to_edge` exports a model,
publishes it and returns what the devices' own telemetry says.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from torch import nn
from torch.utils.data import TensorDataset

from fedge.edge.export import export_model
from fedge.edge.publish import fleet_status, publish
from fedge.errors import UserError
from fedge.processes import ChildProcess
from fedge.progress import report
from fedge.protos import edge_pb2
from fedge.tiers import tier_for

_CLI = [sys.executable, "-m", "fedge.cli"]
#: a local fleet's folders under its workdir: the registry's state and each agent's (`agents/<device>/`)
REGISTRY_DIR, AGENTS_DIR = "registry", "agents"


class DeployError(UserError):
    """The fleet did not reach the new version in time (a device refused it, or is slow or gone)."""


def start_registry(workdir: Path, token: str, timeout: float = 30.0) -> tuple[ChildProcess, str, Path]:
    """Launch `fedge registry serve` on a free loopback port; returns (process, address, public key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = ChildProcess.spawn("registry", [*_CLI, "registry", "serve", "--workdir", str(workdir), "--port", "0"],
                              workdir / "registry.log", env={**os.environ, "FEDGE_PUBLISH_TOKEN": token})
    address = proc.wait_for_line("REGISTRY ", timeout)
    public_key = Path(proc.wait_for_line("PUBLIC_KEY ", timeout))
    return proc, address, public_key


def start_agent(address: str, device_id: str, public_key: Path, workdir: Path, data: Path | None = None,
                tier: str = "mid", extra: list[str] | None = None) -> ChildProcess:
    """Launch `fedge edge agent` (`extra`: further options of that command)."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [*_CLI, "edge", "agent", "--registry", address, "--device-id", device_id, "--public-key", str(public_key),
               "--workdir", str(workdir), "--tier", tier, "--report-interval", "0.3", *(extra or [])]
    if data is not None:
        command += ["--data", str(data)]
    return ChildProcess.spawn(device_id, command, workdir / "agent.log")


def wait_for_fleet(address: str, version: int, devices: list[str], min_predictions: dict[str, int] | None = None,
                   timeout: float = 60.0, refused: Callable[[], dict[str, str]] | None = None
                   ) -> dict[str, edge_pb2.Telemetry]:
    """Poll the registry until every device reports serving `version` (and enough predictions on it).

    `refused()` says which devices refused the version and why: once every device still missing has, waiting
    longer cannot help, and the refusals are the error.
    """
    deadline = time.monotonic() + timeout
    latest: dict[str, edge_pb2.Telemetry] = {}
    task = f"edge: devices serving v{version}"
    report(task, 0, len(devices))
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
        report(task, len(ready), len(devices))
        if len(ready) == len(devices):
            return latest
        reasons = refused() if refused is not None else {}
        if reasons and all(d in reasons for d in devices if d not in ready):
            raise DeployError(f"v{version} was refused: " + "; ".join(f"{d}: {r}" for d, r in sorted(reasons.items())),
                              "the agents keep serving what they served; see their logs")
        time.sleep(0.2)
    serving = {d: latest[d].serving_version if d in latest else None for d in devices}
    behind = [d for d, v in serving.items() if v != version]
    raise DeployError(f"after {timeout:.0f}s, {len(behind)} of {len(devices)} devices do not serve v{version} "
                      f"({', '.join(f'{d}: ' + (f'v{serving[d]}' if serving[d] else 'nothing') for d in behind)})",
                      "see the agents' logs")


def refusals(registry_workdir: Path, version: int) -> dict[str, str]:
    """Why devices refused or rolled back `version`, from the telemetry the registry stored (device -> reason)."""
    reasons: dict[str, str] = {}
    log = registry_workdir / "telemetry.jsonl"
    if not log.exists():
        return reasons
    for line in log.read_text().splitlines():
        record = json.loads(line)
        for event in record.get("events", []):
            if int(event.get("version", 0)) == version and event.get("status") in ("rejected", "rolled_back"):
                reasons[record["device_id"]] = event.get("reason", event["status"])
    return reasons


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
    for own in (REGISTRY_DIR, AGENTS_DIR):  # each deploy starts from an empty registry and agents with no model
        shutil.rmtree(workdir / own, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    x_all, y_all = test_data.tensors[0], test_data.tensors[1]
    # INT8 calibrates on the inputs the fleet will see (no labels), as a device-side calibration would.
    result = export_model(model, x_all, y_all, calibration_x=x_all)
    token = secrets.token_hex(16)
    task = f"edge: registry and {devices} agents"
    report(task, 0, devices + 1)
    registry, address, public_key = start_registry(workdir / REGISTRY_DIR, token)
    agents: list[ChildProcess] = []
    try:
        names, sizes, tiers = [], {}, {}
        for i, (x, y) in enumerate(_shards(test_data, devices)):
            name = f"edge-{i}"
            data_path = workdir / AGENTS_DIR / name / "data.npz"
            data_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(data_path, x=x, y=y)
            tiers[name] = tier_for(i).tier
            agents.append(start_agent(address, name, public_key, workdir / AGENTS_DIR / name, data_path, tiers[name],
                                      extra=["--serve-passes", "1"]))  # telemetry covers each sample once
            names.append(name)
            sizes[name] = len(x)
            report(task, i + 2, devices + 1)
        reply = publish(address, token, result.fp32, "onnx", result.metadata)
        try:
            telemetry = wait_for_fleet(address, reply.version, names, sizes, timeout_s,
                                       refused=lambda: refusals(workdir / REGISTRY_DIR, reply.version))
        except DeployError as err:
            raise DeployError(err.message, f"{err.hint}: {workdir / AGENTS_DIR}/*/agent.log") from err
    finally:
        for proc in agents:
            proc.stop(grace=10.0)
        registry.stop(grace=10.0)
    deployed = sum(1 for t in telemetry.values() if t.serving_version == reply.version)
    runtimes = sorted({t.runtime for t in telemetry.values()})
    labelled = [(t.accuracy, t.num_predictions) for t in telemetry.values() if t.HasField("accuracy")]
    meta = result.metadata
    agent_rows = [{"device": d, "tier": tiers[d], "runtime": t.runtime, "serving_version": int(t.serving_version),
                   "accuracy": float(t.accuracy) if t.HasField("accuracy") else None,
                   "predictions": int(t.num_predictions), "p50_latency_ms": float(t.latency_p50_ms)}
                  for d, t in sorted(telemetry.items()) if d in tiers]
    return {
        "devices": devices,
        "deployed": deployed,
        "version": int(reply.version),
        "agents": agent_rows,
        "runtime": ",".join(runtimes),
        "artifact": {"format": "onnx", "bytes": reply.bytes, "sha256": reply.sha256,
                     "max_abs_diff_vs_torch": float(meta["max_abs_diff_vs_torch"])},
        "int8": {"bytes": int(meta["int8_bytes"]), "accuracy": float(meta["int8_accuracy"])},
        "p50_latency_ms": float(np.median([t.latency_p50_ms for t in telemetry.values()])),
        "accuracy": float(sum(a * n for a, n in labelled) / max(sum(n for _, n in labelled), 1)),
    }
