"""From a run to a device with the command line alone: `fedge run --quick`, `fedge export --from`, a registry,
an agent, `fedge registry publish`; the agent then serves the federated model (its accuracy, not the base's)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.edge.fleet import wait_for_fleet
from fedge.processes import ChildProcess

pytestmark = pytest.mark.slow

FEDGE = [sys.executable, "-m", "fedge.cli"]


def fedge(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run([*FEDGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"fedge {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_runs_federated_model_reaches_an_agent(tmp_path: Path) -> None:
    fedge("run", "--quick", "--methods", "lora-fedavg", "--rounds", "2", "--clients", "3", "--edge-devices", "0",
          cwd=tmp_path)
    results = json.loads((tmp_path / "fedge-out" / "results.json").read_text())
    federated = results["methods"]["lora-fedavg"]["final"]["accuracy"]
    base = results["base"]["accuracy"]
    assert federated > base + 0.1, (base, federated)

    fedge("export", "--from", "fedge-out", cwd=tmp_path)
    export = tmp_path / "fedge-out" / "export"
    report = json.loads((export / "export.json").read_text())
    assert (report["model"], report["method"], report["round"]) == ("federated", "lora-fedavg", 2)
    assert report["fp32_accuracy"] == pytest.approx(federated, abs=1e-9)  # the run's own evaluation data
    samples = len(np.load(export / "samples.npz")["y"])

    token = secrets.token_hex(8)
    registry = ChildProcess.spawn("registry", [*FEDGE, "registry", "serve", "--workdir", "fedge-out/registry",
                                               "--port", "0"], tmp_path / "registry.log",
                                  env={**os.environ, "FEDGE_PUBLISH_TOKEN": token}, cwd=tmp_path)
    agent: ChildProcess | None = None
    try:
        address = registry.wait_for_line("REGISTRY ", 60)
        public_key = registry.wait_for_line("PUBLIC_KEY ", 60)
        agent = ChildProcess.spawn("cam-0", [*FEDGE, "edge", "agent", "--registry", address, "--public-key", public_key,
                                             "--device-id", "cam-0", "--workdir", "fedge-out/cam-0", "--data",
                                             str(export / "samples.npz"), "--serve-passes", "1", "--precisions", "fp32",
                                             "--report-interval", "0.3"], tmp_path / "agent.log", cwd=tmp_path)
        out = fedge("registry", "publish", str(export), "--registry", address, "--token", token,
                    cwd=tmp_path)
        assert out.startswith("published v1")
        telemetry = wait_for_fleet(address, 1, ["cam-0"], {"cam-0": samples}, timeout=120)["cam-0"].last_telemetry
        # Every held-out sample served once on the device: its accuracy is the federated model's, far above the base's.
        assert telemetry.accuracy == pytest.approx(federated, abs=1e-6)
        status = fedge("registry", "status", "--registry", address, cwd=tmp_path)
        assert "cam-0" in status and "v1" in status and f"{federated:.4f}" in status
        manifest = json.loads(next((tmp_path / "fedge-out" / "cam-0" / "models").glob("v*/manifest.json")).read_text())
        assert manifest["metadata"]["method"] == "lora-fedavg" and manifest["metadata"]["model"] == "federated"
    finally:
        if agent is not None:
            agent.stop()
        registry.stop()
