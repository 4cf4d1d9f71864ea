"""A fleet of edge agents on this machine: a registry and K agents as separate processes, deploy, wait, measure.

The registry and the agents are launched through the command line
(`fedge registry serve`, `fedge edge agent`) and reached over real gRPC on
loopback, exactly as on separate machines (`LocalFleet`); `deploy_to_edge` exports
a model, publishes it as one version of several formats and returns what each
device chose and what its own telemetry says; `deploy_adapter_updates` pushes a
base once and then each new adapter as an adapter update.
"""

from __future__ import annotations

import copy
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.adapters import load_adapter_state
from fedge.codecs import Codec
from fedge.edge.adapters.delta import (
    ADAPTER_META,
    FP32_ADAPTER,
    FP32_UNMERGED,
    adapter_tensors,
    adapter_update,
    default_codec,
)
from fedge.edge.adapters.export import checked_unmerged, unmerged_format
from fedge.edge.agreement import REFERENCE_SAMPLES
from fedge.edge.artifacts import BundleFile
from fedge.edge.export import ExportResult, device_samples, export_version
from fedge.edge.publish import fleet_status, publish
from fedge.errors import UserError
from fedge.federated_model import merged_copy
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


class LocalFleet:
    """A registry and `devices` agents, each a process of its own on loopback serving its shard of `test_data` once
    per version; `deploy` publishes a version and waits until every device serves it. A context manager: the
    processes stop on exit. Each fleet starts from an empty registry and agents with no model.

    `precisions`: per device, what it declares it takes (e.g. "fp16,fp32"; "" for what its capabilities allow).
    `emulate`: per device, an x86-64 CPU model to run it on under qemu-user (e.g. "Haswell-noTSX"; "" for this
    machine's CPU).
    """

    def __init__(self, test_data: TensorDataset, devices: int, workdir: str | Path,
                 precisions: list[str] | None = None, emulate: list[str] | None = None,
                 task: str = "classification") -> None:
        if devices < 1:
            raise ValueError("devices must be >= 1")
        self.workdir = Path(workdir)
        self._shards = _shards(test_data, devices, task)
        self._precisions, self._emulate = precisions, emulate
        self._token = secrets.token_hex(16)
        self._registry: ChildProcess | None = None
        self._agents: list[ChildProcess] = []
        self.address = ""
        self.sizes: dict[str, int] = {}  # each device's shard: it serves every sample of it once per version

    def __enter__(self) -> Self:
        for own in (REGISTRY_DIR, AGENTS_DIR):  # each fleet starts from an empty registry and agents with no model
            shutil.rmtree(self.workdir / own, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        devices = len(self._shards)
        task = f"edge: registry and {devices} agents"
        report(task, 0, devices + 1)
        try:
            self._registry, self.address, public_key = start_registry(self.workdir / REGISTRY_DIR, self._token)
            for i, shard in enumerate(self._shards):
                name = f"edge-{i}"
                data_path = self.workdir / AGENTS_DIR / name / "data.npz"
                data_path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(data_path, **shard)
                declared, cpu = (_nth(options, i) for options in (self._precisions, self._emulate))
                extra = ["--serve-passes", "1", *(["--precisions", declared] if declared else [])]  # each sample once
                self._agents.append(start_agent(self.address, name, public_key, self.workdir / AGENTS_DIR / name,
                                                data_path, tier_for(i).tier, extra=extra,
                                                launcher=emulator(cpu) if cpu else None))
                self.sizes[name] = len(next(iter(shard.values())))
                report(task, i + 2, devices + 1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._agents:
            proc.stop(grace=10.0)
        if self._registry is not None:
            self._registry.stop(grace=10.0)
        self._agents, self._registry = [], None

    def deploy(self, formats: dict[str, BundleFile], metadata: dict[str, Any],
               timeout_s: float = 120.0) -> tuple[edge_pb2.PublishReply, dict[str, edge_pb2.DeviceStatus]]:
        """Publish one version and wait until every device serves it (each sample of its shard once)."""
        reply = publish(self.address, self._token, formats, metadata)
        try:
            fleet = wait_for_fleet(self.address, reply.version, list(self.sizes), self.sizes, timeout_s)
        except DeployError as err:
            raise DeployError(err.message, f"{err.hint}: {self.workdir / AGENTS_DIR}/*/agent.log") from err
        return reply, fleet


def fleet_version(model: nn.Module, test_data: TensorDataset, task: str = "classification") -> ExportResult:
    """One version's formats of `model` (fp32, int8, fp16, a reference set; a causal LM: fp32 and int8), checked on
    `test_data`.

    INT8 calibrates on the inputs the fleet will see (no labels), as a device-side calibration would; the
    reference set is held out from calibration.
    """
    x_all, y_all = test_data.tensors[0], test_data.tensors[1]
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    held_out = order[: min(REFERENCE_SAMPLES, len(x_all) // 4)]
    calibration = order[len(held_out):] if len(order) > len(held_out) else order
    return export_version(model, x_all, y_all, task, calibration_x=x_all[calibration], reference_x=x_all[held_out])


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
    `precisions` and `emulate` are per device (`LocalFleet`).
    """
    result = fleet_version(model, test_data, task)
    with LocalFleet(test_data, devices, workdir, precisions, emulate, task) as fleet:
        reply, status = fleet.deploy(result.formats, result.metadata, timeout_s)
    return edge_report(result, reply, status)


def deploy_adapter_updates(start: Any, adapters: list[tuple[str, Mapping[str, np.ndarray]]],
                           test_data: TensorDataset, devices: int, workdir: str | Path, codec: Codec | None = None,
                           timeout_s: float = 120.0, precisions: list[str] | None = None,
                           emulate: list[str] | None = None) -> dict[str, Any]:
    """Push `start` (a peft model: the base with its first adapter) as a whole version, then each of `adapters`
    (label, adapter tensors by peft's names) as the next version, an adapter update against the one before.

    Every version also carries its whole formats (merged fp32, int8, fp16, the unmerged graph with its adapter, a
    reference set), so a device that serves something an update cannot apply to takes a whole model. A version's
    adapter is the one before plus the decoded change (`codec`, default `default_codec()`); its formats are
    exported from that adapter, and the unmerged graph is checked against the merged model. Returns results.json's
    "edge" entry for the last version, with "versions" (each version's sizes and what each device fetched, the
    mode it serves an adapter in, its accuracy) and "bytes_per_device".
    """
    codec = codec or default_codec()
    x_all = test_data.tensors[0]
    model: Any = copy.deepcopy(start).eval()  # a peft model
    versions: list[dict[str, Any]] = []
    with LocalFleet(test_data, devices, workdir, precisions, emulate) as fleet:
        result = fleet_version(model, test_data)
        unmerged = unmerged_format(model, x_all)
        reply, status = fleet.deploy({**result.formats, FP32_UNMERGED: unmerged}, {**result.metadata, "model": "base"},
                                     timeout_s)
        versions.append(_version_report("base", result, unmerged, None, reply, status))
        for label, adapter in adapters:
            update, target = adapter_update(unmerged.data, reply.version, adapter, codec)
            exact = _accuracy(model, adapter, test_data)
            load_adapter_state(model, adapter_tensors(target))  # the version's adapter: the codec's, on every device
            result = fleet_version(model, test_data)
            unmerged = checked_unmerged(target, unmerged.metadata[ADAPTER_META], model, x_all)
            formats = {**result.formats, FP32_UNMERGED: unmerged, FP32_ADAPTER: update}
            reply, status = fleet.deploy(formats, {**result.metadata, "model": label}, timeout_s)
            versions.append(_version_report(label, result, unmerged, update, reply, status, exact))
    edge = edge_report(result, reply, status)
    edge["versions"] = versions
    edge["bytes_per_device"] = {name: [v["devices"][name]["bytes_fetched"] for v in versions] for name in status}
    return edge


def _accuracy(model: Any, adapter: Mapping[str, np.ndarray], test_data: TensorDataset) -> float:
    """PyTorch's accuracy of `model` with `adapter` (before any codec): the federation's own model."""
    exact = copy.deepcopy(model)
    load_adapter_state(exact, {k: np.array(v, np.float32) for k, v in adapter.items()})
    with torch.no_grad():
        logits = merged_copy(exact)(test_data.tensors[0].float())
    return float((logits.argmax(1) == test_data.tensors[1]).float().mean())


def _version_report(label: str, result: ExportResult, unmerged: BundleFile, update: BundleFile | None,
                    reply: edge_pb2.PublishReply, fleet: dict[str, edge_pb2.DeviceStatus],
                    exact_accuracy: float | None = None) -> dict[str, Any]:
    """One version of an adapter-update rollout: its formats' sizes, the update's, and what each device did."""
    devices = {name: _device_report(status, reply.version) for name, status in sorted(fleet.items())}
    entry: dict[str, Any] = {
        "version": reply.version, "model": label, "accuracy": result.metadata.get("fp32_accuracy"),
        "fleet_accuracy": _fleet_accuracy(devices), "bytes": {f.format: f.bytes for f in reply.formats},
        "unmerged_max_abs_diff_vs_merged": unmerged.metadata[ADAPTER_META]["max_abs_diff_vs_merged"],
        "devices": devices,
    }
    if update is not None:
        meta = update.metadata
        entry["adapter_update"] = {"codec": meta["codec"], "params": meta["codec_params"],
                                   "bytes": len(update.data), "dense_bytes": meta["dense_bytes"],
                                   "parameters": meta["parameters"],
                                   "of_fp32": len(update.data) / len(result.fp32)}
        entry["federated_accuracy"] = exact_accuracy  # the adapter before coding (PyTorch)
    return entry


def _nth(options: list[str] | None, i: int) -> str:
    return options[i] if options and i < len(options) else ""


def edge_report(result: ExportResult, reply: edge_pb2.PublishReply,
                fleet: dict[str, edge_pb2.DeviceStatus]) -> dict[str, Any]:
    """results.json's "edge" entry: the version's formats as measured at export (on `host`), and each device's
    choice, checks and telemetry."""
    meta = result.metadata
    devices = {name: _device_report(status, reply.version) for name, status in sorted(fleet.items())}
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
        "accuracy": _fleet_accuracy(devices),
    }


def _fleet_accuracy(devices: dict[str, dict[str, Any]]) -> float:
    """The devices' own accuracy on their shards, weighted by what each served: the fleet's accuracy on the data."""
    labelled = [(d["accuracy"], d["predictions"]) for d in devices.values() if d["accuracy"] is not None]
    return float(sum(a * n for a, n in labelled) / max(sum(n for _, n in labelled), 1))


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
    deployed = next((e for e in status.recent_events if e.version == version and e.status == "deployed"), None)
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
            "checks": checks, "bytes_fetched": deployed.bytes_fetched if deployed else None,
            "adapter_mode": deployed.adapter_mode if deployed else "",
            "unmerged_cost": deployed.unmerged_cost if deployed and deployed.unmerged_cost else None}
