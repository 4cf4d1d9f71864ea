"""Edge agents as separate processes on loopback: resume after a kill, and a whole fleet deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _edge_support import base_onnx, target_data, to_npz, trained_model, wait_until

from fedge.edge.fleet import deploy_to_edge
from fedge.edge.registry import Registry, start
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
        version = reg.publish(base_onnx())
        total = reg.store.read(version).manifest.bytes
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
        offsets = [offset for device, v, offset in reg.fetch_log if device == "cam-0" and v == version]
        assert offsets[0] == 0 and offsets[-1] == held, f"fetches started at {offsets}, partial held {held}"
        assert not partial.exists()
        assert (workdir / "current").read_text().strip() == str(version)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        reg.stop()
        server.stop(grace=0.5).wait()


def test_deploy_to_edge_reaches_every_device(tmp_path: Path) -> None:
    report = deploy_to_edge(trained_model(), target_data(), devices=2, workdir=tmp_path)
    assert set(report) == {"devices", "deployed", "runtime", "artifact", "int8", "p50_latency_ms", "accuracy"}
    assert report["devices"] == 2 and report["deployed"] == 2
    assert report["runtime"] == "onnxruntime-cpu"
    artifact = report["artifact"]
    assert set(artifact) == {"format", "bytes", "sha256", "max_abs_diff_vs_torch"}
    assert artifact["format"] == "onnx" and artifact["max_abs_diff_vs_torch"] < 1e-4 and len(artifact["sha256"]) == 64
    assert report["int8"]["bytes"] <= 0.35 * artifact["bytes"]
    assert report["p50_latency_ms"] > 0
    # Each device served its shard once, so the fleet's telemetry accuracy is the model's accuracy on the data.
    expected = evaluate(trained_model(), target_data(), device=torch.device("cpu")).accuracy
    assert report["accuracy"] == pytest.approx(expected, abs=1e-9)
