"""Edge agents as separate processes on loopback: resume after a kill, and a whole fleet deployment."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _edge_support import base_onnx, collapsed, target_data, to_npz, trained_model, wait_until

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
    assert set(report) == {"devices", "deployed", "version", "agents", "runtime", "artifact", "int8", "p50_latency_ms",
                           "accuracy"}
    assert report["devices"] == 2 and report["deployed"] == 2 and report["version"] == 1
    assert [(a["device"], a["serving_version"]) for a in report["agents"]] == [("edge-0", 1), ("edge-1", 1)]
    assert sum(a["predictions"] for a in report["agents"]) == len(target_data())
    assert report["runtime"] == "onnxruntime-cpu"
    artifact = report["artifact"]
    assert set(artifact) == {"format", "bytes", "sha256", "max_abs_diff_vs_torch"}
    assert artifact["format"] == "onnx" and artifact["max_abs_diff_vs_torch"] < 1e-4 and len(artifact["sha256"]) == 64
    assert report["int8"]["bytes"] <= 0.35 * artifact["bytes"]
    assert report["p50_latency_ms"] > 0
    # Each device served its shard once, so the fleet's telemetry accuracy is the model's accuracy on the data.
    expected = evaluate(trained_model(), target_data(), device=torch.device("cpu")).accuracy
    assert report["accuracy"] == pytest.approx(expected, abs=1e-9)

    # A second deploy into the same folder starts a fleet of its own: a fresh registry (the new model is v1, not v2)
    # and agents without the first fleet's models (which would restore and canary against them), so a weaker model
    # (its classes rolled by one) is served as it is.
    weaker = copy.deepcopy(trained_model())
    with torch.no_grad():
        weaker.fc2.weight.copy_(weaker.fc2.weight.roll(1, dims=0))
        weaker.fc2.bias.copy_(weaker.fc2.bias.roll(1))
    again = deploy_to_edge(weaker, target_data(), devices=2, workdir=tmp_path)
    assert again["deployed"] == 2 and again["version"] == 1
    assert again["accuracy"] == pytest.approx(evaluate(weaker, target_data(), device=torch.device("cpu")).accuracy,
                                              abs=1e-9)
    assert again["artifact"]["sha256"] != artifact["sha256"]


def test_a_refused_deployment_says_which_device_refused_and_why(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DeployError) as refused:
        deploy_to_edge(collapsed(trained_model()), target_data(), devices=2, workdir=tmp_path, timeout_s=90.0)
    assert time.monotonic() - started < 80  # the refusals end the wait; it does not run into the timeout
    assert isinstance(refused.value, UserError)
    assert "v1 was refused: edge-0: canary failed: collapsed" in refused.value.message
    assert "edge-1: canary failed: collapsed" in refused.value.message
    assert str(tmp_path / "agents") in refused.value.hint
