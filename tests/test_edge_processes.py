"""Edge agents as separate processes on loopback: resume after a kill, and a whole fleet deployment."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _edge_support import base_onnx, bundle, collapsed, target_data, to_npz, trained_model, wait_until

from fedge.edge.export import accuracy
from fedge.edge.fleet import DeployError, deploy_to_edge
from fedge.edge.registry import Registry, start
from fedge.errors import UserError
from fedge.training import evaluate

pytestmark = pytest.mark.slow


def launch_agent(address: str, public: Path, workdir: Path, data: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "fedge.cli", "edge", "agent", "--registry", address, "--device-id", "cam-0",
            "--public-key", str(public), "--workdir", str(workdir), "--data", str(data), "--report-interval", "0.2", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_agent_killed_mid_download_resumes_from_its_partial_offset(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    server, port = start(reg, "127.0.0.1", 0, workers=16)
    address = f"127.0.0.1:{port}"
    public = tmp_path / "registry.pub.pem"
    public.write_bytes(reg.public_key_pem)
    data = tmp_path / "data.npz"
    to_npz(data, target_data())
    workdir = tmp_path / "cam-0"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        version = reg.publish(bundle(fp32=base_onnx()))
        total = reg.store.read(version).manifest.formats["fp32"].bytes
        # A slow link: 64 KiB chunks, 30 ms apart (about 2 s for the whole artifact).
        procs.append(launch_agent(address, public, workdir, data, "--chunk-size", "65536", "--chunk-delay", "0.03"))
        partial = wait_until(lambda: next((p for p in (workdir / "downloads").glob("*.partial")
                                           if p.stat().st_size >= total // 4), None), timeout=60, what="a partial download")
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        held = partial.stat().st_size
        assert 0 < held < total, "the kill must land mid-download"

        procs.append(launch_agent(address, public, workdir, data))
        wait_until(lambda: any(d.last_telemetry.serving_version == version for d in reg.FleetStatus(None, None).devices),
                   timeout=60, what="the restarted agent to serve the artifact")
        offsets = [offset for device, v, fmt, offset in reg.fetch_log if device == "cam-0" and v == version]
        assert offsets[0] == 0 and offsets[-1] == held, f"fetches started at {offsets}, partial held {held}"
        assert not partial.exists()
        assert (workdir / "current").read_text().split() == [str(version), "fp32"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        reg.stop()
        server.stop(grace=0.5).wait()


def test_deploy_to_edge_reaches_every_device(tmp_path: Path) -> None:
    report = deploy_to_edge(trained_model(), target_data(), devices=2, workdir=tmp_path, precisions=["", "fp16,fp32"])
    assert set(report) == {"devices", "deployed", "runtime", "host", "artifact", "fp32", "int8", "fp16",
                           "formats_served", "fleet", "p50_latency_ms", "accuracy"}
    assert report["devices"] == 2 and report["deployed"] == 2 and report["artifact"]["version"] == 1
    assert report["runtime"] == "onnxruntime-cpu"
    assert report["host"]["int8_kernel"] in ("vnni", "pmaddubsw", "sdot", "neon") and report["host"]["isa"]
    artifact = report["artifact"]
    assert set(artifact) == {"version", "sha256", "bytes", "max_abs_diff_vs_torch", "formats"}
    assert set(artifact["formats"]) == {"fp32", "int8", "fp16", "reference"} and len(artifact["sha256"]) == 64
    assert artifact["max_abs_diff_vs_torch"] < 1e-4
    assert report["int8"]["bytes"] <= 0.35 * report["fp32"]["bytes"] and report["int8"]["weight_bits"] == 7
    assert abs(report["int8"]["accuracy"] - report["fp32"]["accuracy"]) <= 0.01
    assert report["p50_latency_ms"] > 0
    # edge-0 takes what its CPU allows (int8 first), edge-1 declared fp16 first (`--precisions`): two formats.
    assert report["formats_served"] == {"int8": 1, "fp16": 1}
    fleet = report["fleet"]
    assert fleet["edge-0"]["precisions"] == ["int8", "fp16", "fp32"] and fleet["edge-1"]["precisions"] == ["fp16", "fp32"]
    x, y = target_data().tensors[0].numpy(), target_data().tensors[1].numpy()
    shards = dict(zip(("edge-0", "edge-1"), np.array_split(np.arange(len(x)), 2)))
    for name, device in fleet.items():
        check = device["checks"][device["format"]]
        assert check["passed"] and check["reference"] == "device inputs" and check["top1"] >= 0.95
        assert device["failures"] == 0 and device["predictions"] == len(shards[name])
        # Each device served its shard once, so its telemetry accuracy is its format's accuracy on that shard.
        served = (tmp_path / "registry" / "artifacts" / "v000001" / f"{device['format']}.bin").read_bytes()
        assert device["accuracy"] == pytest.approx(accuracy(served, x[shards[name]], y[shards[name]]), abs=1e-9)

    # A second deploy into the same folder starts a fleet of its own: a fresh registry (the new model is v1, not v2)
    # and agents without the first fleet's models (which would restore and canary against them), so a weaker model
    # (its classes rolled by one) is served as it is.
    weaker = copy.deepcopy(trained_model())
    with torch.no_grad():
        weaker.fc2.weight.copy_(weaker.fc2.weight.roll(1, dims=0))
        weaker.fc2.bias.copy_(weaker.fc2.bias.roll(1))
    again = deploy_to_edge(weaker, target_data(), devices=2, workdir=tmp_path, precisions=["fp32", "fp32"])
    assert again["deployed"] == 2 and again["artifact"]["version"] == 1 and again["formats_served"] == {"fp32": 2}
    assert again["accuracy"] == pytest.approx(evaluate(weaker, target_data(), device=torch.device("cpu")).accuracy,
                                              abs=1e-9)
    assert again["artifact"]["sha256"] != artifact["sha256"]


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="emulating an x86-64 CPU without VNNI needs qemu-user (qemu-x86_64) on an x86-64 host")
def test_an_agent_on_an_emulated_cpu_without_vnni_serves_int8_at_full_accuracy(tmp_path: Path) -> None:
    """On x86 without VNNI, ONNX Runtime sums pairs of int8 products in int16; under qemu that kernel really runs.

    With full-range int8 weights this device would refuse int8 (its agreement with fp32 drops); with the export's
    7-bit weights it takes int8 and its outputs equal this machine's, so its accuracy is the int8 accuracy here.
    """
    report = deploy_to_edge(trained_model(), target_data(), devices=2, workdir=tmp_path, timeout_s=600,
                            emulate=["", "Haswell-noTSX"])
    emulated = report["fleet"]["edge-1"]
    assert emulated["int8_kernel"] == "pmaddubsw" and "AVX2" in emulated["isa"] and "AVX512VNNI" not in emulated["isa"]
    assert report["formats_served"] == {"int8": 2}
    x, y = target_data().tensors[0].numpy(), target_data().tensors[1].numpy()
    shard = np.array_split(np.arange(len(x)), 2)[1]
    int8 = (tmp_path / "registry" / "artifacts" / "v000001" / "int8.bin").read_bytes()
    assert emulated["accuracy"] == pytest.approx(accuracy(int8, x[shard], y[shard]), abs=1e-9)
    assert emulated["checks"]["int8"]["top1"] >= 0.95 and emulated["failures"] == 0


def test_a_refused_deployment_says_which_device_refused_and_why(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DeployError) as refused:
        deploy_to_edge(collapsed(trained_model()), target_data(), devices=2, workdir=tmp_path, timeout_s=90.0)
    assert time.monotonic() - started < 80  # the refusals end the wait; it does not run into the timeout
    assert isinstance(refused.value, UserError)
    assert "v1 was refused: edge-0: no format passed: int8: canary failed: collapsed" in refused.value.message
    assert "edge-1: no format passed: int8: canary failed: collapsed" in refused.value.message
    assert str(tmp_path / "agents") in refused.value.hint
