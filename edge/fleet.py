"""A fleet of edge agents on this machine: a registry and K agents as separate processes, deploy, wait, measure.

The registry and the agents are launched through the command line
(`fedge registry serve`, `fedge edge agent`) and reached over real gRPC on
loopback, exactly as on separate machines; `deploy_to_edge` exports a model,
publishes it as one version of several formats and returns what each device
chose and what its own telemetry says.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.edge.agreement import REFERENCE_SAMPLES
from fedge.edge.artifacts import BundleFile
from fedge.edge.export import ExportResult, device_samples, export_version
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


def emulator(cpu: str) -> list[str]:
    """The command prefix that runs this machine's Python on an emulated x86-64 CPU model (qemu-user), e.g.
    "Haswell-noTSX" (AVX2 without VNNI); numpy's CPUID detection and ONNX Runtime's kernels see that CPU."""
    if shutil.which("qemu-x86_64") is None:
        raise DeployError("emulating a CPU needs qemu-user (qemu-x86_64), e.g. `apt-get install qemu-user`")
    if platform.machine() != "x86_64":
        raise DeployError("qemu-user runs this machine's Python only on an x86-64 host")
    return ["qemu-x86_64", "-cpu", cpu]


def start_agent(address: str, device_id: str, public_key: Path, workdir: Path, data: Path | None = None,
                tier: str = "mid", extra: list[str] | None = None, launcher: list[str] | None = None) -> ChildProcess:
    """Launch `fedge edge agent` (`extra`: further options of that command; `launcher`: a command prefix to run it
    under, such as `emulator(cpu)`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [*(launcher or []), *_CLI, "edge", "agent", "--registry", address, "--device-id", device_id, "--public-key", str(public_key),
               "--workdir", str(workdir), "--tier", tier, "--report-interval", "0.3", *(extra or [])]
    if data is not None:
        command += ["--data", str(data)]
    return ChildProcess.spawn(device_id, command, workdir / "agent.log")


def wait_for_fleet(address: str, version: int, devices: list[str], min_predictions: dict[str, int] | None = None,
                   timeout: float = 60.0) -> dict[str, edge_pb2.DeviceStatus]:
    """Poll the registry until every device reports serving `version` (and enough predictions on it).

    A device that refused the version (its telemetry's events say why) ends the wait: the refusals are the error.
    """
    deadline = time.monotonic() + timeout
    latest: dict[str, edge_pb2.DeviceStatus] = {}
    task = f"edge: devices serving v{version}"
    report(task, 0, len(devices))
    while time.monotonic() < deadline:
        try:
            status = fleet_status(address)
        except grpc.RpcError:
            time.sleep(0.2)
            continue
        latest = {d.profile.device_id: d for d in status.devices if d.HasField("last_telemetry")}
        ready = [
            d for d in devices
            if d in latest and latest[d].last_telemetry.serving_version == version
            and latest[d].last_telemetry.num_predictions >= (min_predictions or {}).get(d, 0)
        ]
        report(task, len(ready), len(devices))
        if len(ready) == len(devices):
            return latest
        refused = {d: e.reason for d in devices if d in latest for e in latest[d].recent_events
                   if e.version == version and e.status in ("rejected", "rolled_back")}
        if refused and all(d in refused for d in devices if d not in ready):  # waiting longer cannot help
            raise DeployError(f"v{version} was refused: " + "; ".join(f"{d}: {r}" for d, r in sorted(refused.items())),
                              "the agents keep serving what they served; see their logs")
        time.sleep(0.2)
    serving = {d: latest[d].last_telemetry.serving_version if d in latest else None for d in devices}
    behind = [d for d, v in serving.items() if v != version]
    raise DeployError(f"after {timeout:.0f}s, {len(behind)} of {len(devices)} devices do not serve v{version} "
                      f"({', '.join(f'{d}: ' + (f'v{serving[d]}' if serving[d] else 'nothing') for d in behind)})",
                      "see the agents' logs")


def _shards(data: TensorDataset, devices: int, task: str) -> list[dict[str, np.ndarray]]:
    """Each device's part of the test data, as its agent reads it (`--data`); all of it for each when it is small."""
    arrays = device_samples(*data.tensors[:2], task=task)
    n = len(next(iter(arrays.values())))
    parts = np.array_split(np.arange(n), devices) if n >= 2 * devices else [np.arange(n)] * devices
    return [{name: a[part] for name, a in arrays.items()} for part in parts]


def deploy_to_edge(model: nn.Module, test_data: TensorDataset, devices: int, workdir: str | Path,
                   timeout_s: float = 120.0, precisions: list[str] | None = None,
                   emulate: list[str] | None = None, task: str = "classification") -> dict[str, Any]:
    """Export `model` as one version (fp32, int8, fp16, a reference set; a causal LM: fp32 and int8), publish it,
    and wait until `devices` edge agents serve it, each in the smallest format that passes its checks against fp32
    on its own inputs.

    Each agent serves its shard of `test_data` (labelled; a causal LM's: token
    ids and attention mask, labelled by their next tokens) once, request by
    request, so the returned accuracy and p50 latency (batch 1) come from the
    devices' own telemetry, in the format each chose (results.json's "edge" entry).
    `precisions`: per device, what it declares it takes (e.g. "fp16,fp32"; "" for
    what its capabilities allow). `emulate`: per device, an x86-64 CPU model to run
    it on under qemu-user (e.g. "Haswell-noTSX"; "" for this machine's CPU).
    """
    if devices < 1:
        raise ValueError("devices must be >= 1")
    workdir = Path(workdir)
    for own in (REGISTRY_DIR, AGENTS_DIR):  # each deploy starts from an empty registry and agents with no model
        shutil.rmtree(workdir / own, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    x_all, y_all = test_data.tensors[0], test_data.tensors[1]
    # INT8 calibrates on the inputs the fleet will see (no labels), as a device-side calibration would; the
    # reference set is held out from calibration.
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    held_out = order[: min(REFERENCE_SAMPLES, len(x_all) // 4)]
    calibration = order[len(held_out):] if len(order) > len(held_out) else order
    result = export_version(model, x_all, y_all, task, calibration_x=x_all[calibration], reference_x=x_all[held_out])
    token = secrets.token_hex(16)
    step = f"edge: registry and {devices} agents"
    report(step, 0, devices + 1)
    registry, address, public_key = start_registry(workdir / REGISTRY_DIR, token)
    agents: list[ChildProcess] = []
    try:
        names, sizes = [], {}
        for i, shard in enumerate(_shards(test_data, devices, task)):
            name = f"edge-{i}"
            data_path = workdir / AGENTS_DIR / name / "data.npz"
            data_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(data_path, **shard)
            declared, cpu = (_nth(options, i) for options in (precisions, emulate))
            extra = ["--serve-passes", "1", *(["--precisions", declared] if declared else [])]  # each sample once
            agents.append(start_agent(address, name, public_key, workdir / AGENTS_DIR / name, data_path, tier_for(i).tier,
                                      extra=extra, launcher=emulator(cpu) if cpu else None))
            names.append(name)
            sizes[name] = len(next(iter(shard.values())))
            report(step, i + 2, devices + 1)
        reply = publish(address, token, result.formats, result.metadata)
        try:
            fleet = wait_for_fleet(address, reply.version, names, sizes, timeout_s)
        except DeployError as err:
            raise DeployError(err.message, f"{err.hint}: {workdir / AGENTS_DIR}/*/agent.log") from err
    finally:
        for proc in agents:
            proc.stop(grace=10.0)
        registry.stop(grace=10.0)
    return edge_report(result, reply, fleet)


def _nth(options: list[str] | None, i: int) -> str:
    return options[i] if options and i < len(options) else ""


def edge_report(result: ExportResult, reply: edge_pb2.PublishReply,
                fleet: dict[str, edge_pb2.DeviceStatus]) -> dict[str, Any]:
    """results.json's "edge" entry: the version's formats as measured at export (on `host`), and each device's
    choice, checks and telemetry."""
    meta = result.metadata
    devices = {name: _device_report(status, reply.version) for name, status in sorted(fleet.items())}
    labelled = [(d["accuracy"], d["predictions"]) for d in devices.values() if d["accuracy"] is not None]
    served: dict[str, int] = {}
    for d in devices.values():
        served[d["format"]] = served.get(d["format"], 0) + 1
    return {
        "devices": len(devices),
        "deployed": sum(1 for d in devices.values() if d["version"] == reply.version),
        "runtime": ",".join(sorted({d["runtime"] for d in devices.values()})),
        "host": meta["host"],
        "artifact": {"version": reply.version, "sha256": reply.sha256, "bytes": reply.bytes,
                     "max_abs_diff_vs_torch": float(meta["max_abs_diff_vs_torch"]),
                     "formats": {f.format: {"bytes": f.bytes, "sha256": f.sha256} for f in reply.formats}},
        **{name: _format_report(f) for name, f in result.formats.items() if f.kind == "onnx"},
        "formats_served": served,
        "fleet": devices,
        "p50_latency_ms": float(np.median([d["p50_latency_ms"] for d in devices.values()])),
        "accuracy": float(sum(a * n for a, n in labelled) / max(sum(n for _, n in labelled), 1)),
    }


def _format_report(entry: BundleFile) -> dict[str, Any]:
    meta = entry.metadata
    report: dict[str, Any] = {"bytes": len(entry.data)}
    for key in ("accuracy", "perplexity", "weight_bits", "mode"):
        if key in meta:
            report[key] = meta[key]
    if "agreement_vs_fp32" in meta:
        report["agreement_vs_fp32"] = meta["agreement_vs_fp32"]["top1"]
        report["max_logit_diff_vs_fp32"] = meta["agreement_vs_fp32"]["max_logit_diff"]
    return report


def _device_report(status: edge_pb2.DeviceStatus, version: int) -> dict[str, Any]:
    t, caps = status.last_telemetry, status.profile.capabilities
    checks = {}
    for e in status.recent_events:
        if e.version == version and e.format and e.status in ("deployed", "format_refused"):
            check: dict[str, Any] = {"passed": e.status == "deployed", "reason": e.reason}
            if e.HasField("agreement"):
                a = e.agreement
                check.update(top1=a.top1, max_logit_diff=a.max_logit_diff, logit_range=a.logit_range,
                             samples=a.samples, reference=a.reference)
            checks[e.format] = check
    return {"version": t.serving_version, "tier": status.profile.tier, "format": t.format, "runtime": t.runtime,
            "precisions": list(status.profile.precisions), "machine": caps.machine, "isa": list(caps.isa),
            "int8_kernel": caps.int8_kernel, "accuracy": t.accuracy if t.HasField("accuracy") else None,
            "predictions": t.num_predictions, "failures": t.num_failures, "p50_latency_ms": t.latency_p50_ms,
            "checks": checks}
