"""Flower's deployment runtime on loopback: real SuperLink, SuperNode, ServerApp and ClientApp processes over gRPC.

Each test starts its own SuperLink and SuperNodes on free ports with
`FLWR_HOME` in a temporary folder, drives the federation with `flwr run`, and
stops every process group in `finally` (the deployment's context manager).
Runs are kept small (2 rounds, 1 local epoch) so the module fits a 2-core box.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from fedge.client.node_data import save_node_data
from fedge.processes import ChildProcess
from fedge.server.local_deployment import CONNECTION, LocalDeployment, run_local

pytestmark = [
    pytest.mark.slow,
    pytest.mark.deployment,
    pytest.mark.skipif(not all(shutil.which(b) for b in ("flower-superlink", "flower-supernode", "flwr")),
                       reason="Flower's deployment binaries (flower-superlink, flower-supernode, flwr) are not installed"),
]

RUN_TIMEOUT = 420.0  # bound on one run under a loaded 2-core machine


def small_run(out: Path, nodes: int, **extra: Any) -> dict[str, Any]:
    return {"num-server-rounds": 2, "num-clients": nodes, "local-epochs": 1, "out-dir": str(out),
            "node-wait": 120.0, **extra}


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(poll)


def log_has(proc: ChildProcess, text: str) -> bool:
    return proc.log.exists() and text in proc.log.read_text(errors="replace")


def method_entry(out: Path, method: str) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())["methods"][method]


def finish(dep: LocalDeployment, run_id: int) -> dict[str, Any]:
    info = dep.wait(run_id, RUN_TIMEOUT)
    server_log = dep.logs_of(run_id)
    (dep.logs / f"serverapp-{run_id}.log").write_text(server_log)  # kept with the test's other logs
    assert info["status"] == "finished:completed", server_log[-3000:]
    return info


def message_rows(out: Path, method: str) -> list[dict[str, Any]]:
    """The per-message log: one row per reply with its timeline and the ClientApp process that served it."""
    return [json.loads(line) for line in (out / f"messages-{method}.jsonl").read_text().splitlines()]


def serving_process(dep: LocalDeployment, node: str) -> psutil.Process:
    """The process that serves `node`'s messages: the child of its `fedge clientapp` supervisor."""
    supervisor = psutil.Process(dep.clientapps[node].popen.pid)
    wait_for(lambda: bool(supervisor.children()), 60, f"{node}'s ClientApp process")
    return supervisor.children()[0]


def test_three_supernodes_two_rounds_survive_a_killed_node(tmp_path: Path) -> None:
    """SuperLink + 3 SuperNodes run 2 rounds of a compressed method (fedzip) to completion, although one
    SuperNode dies while training round 1: that round aggregates the other two after round-timeout, and
    the node, restarted at once, trains again in round 2.
    """
    out = tmp_path / "out"
    with LocalDeployment(tmp_path / "fleet", num_nodes=3) as dep:
        dep.start()
        crashed = serving_process(dep, "supernode-1")
        crashed.kill()  # node 1's long-lived ClientApp process dies: its supervisor starts another
        wait_for(lambda: dep.clientapps["supernode-1"].output().count("started") == 2, 60, "a new ClientApp process")
        run_id = dep.submit(small_run(out, 3, method="fedzip", **{"round-timeout": 30.0, "min-replies": 0.5}))
        victim = dep.nodes["supernode-2"]
        wait_for(lambda: log_has(victim, "Receiving: train message"), 300, "round 1 to reach supernode-2")
        victim.stop(sig=signal.SIGKILL)  # a crash: no deactivation, the SuperLink only sees silence
        rejoined = dep.start_supernode(2, name="supernode-2-rejoined")
        wait_for(lambda: not dep.clientapps["supernode-2"].alive(), 30, "the dead node's ClientApp process to leave")
        info = finish(dep, run_id)
        assert log_has(rejoined, "Receiving: train message")
    rows = message_rows(out, "fedzip")
    assert crashed.pid not in {r["process_id"] for r in rows}
    assert max(r["process_messages"] for r in rows) >= 4  # one process served a node's messages, round after round
    entry = method_entry(out, "fedzip")
    overhead = entry["per_message_overhead_s"]
    assert overhead["count"] == len(rows) >= 12 and 0 < overhead["median"] <= overhead["max"]
    assert overhead["most_messages_per_process"] >= 4
    rounds = entry["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["sent"] == 3 and rounds[0]["clients"] == 2
    assert rounds[1]["clients"] == 3  # the rejoined node trained; a not yet expired ghost may add to `sent`
    assert all(r["round_seconds"] > 0 and r["uplink_bytes"] > 0 for r in rounds)
    dense_downloads = 4 * entry["final"]["trainable_params"] * sum(r["sent"] for r in rounds)  # fp32, every message
    assert 0 < entry["final"]["downlink_bytes"] < dense_downloads / 4  # fedzip's downloads are coded too
    assert info["network-traffic"]["total-bytes"] > 0


def changed_app(app_dir: Path, where: Path) -> Path:
    """A copy of the Flower app whose bundle differs from the original's (another FAB hash)."""
    copy = where / "app"
    shutil.copytree(app_dir, copy, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "tests", "__pycache__", "*.egg-info", ".*cache"))
    with open(copy / "client" / "app.py", "a") as app:
        app.write("\n# the next release\n")
    return copy


def test_server_restart_resumes_from_checkpoint(tmp_path: Path) -> None:
    """The SuperLink (with its ServerApp) is killed after round 1; a new `flwr run` finishes round 2 only.

    The second `flwr run` ships a changed app bundle: each node's long-lived ClientApp process restarts
    itself in place (same process id, a fresh interpreter) to run the new code.
    """
    out = tmp_path / "out"
    config = small_run(out, 2, method="flasc", **{"round-timeout": 240.0})
    manifests = out / "checkpoints"
    with LocalDeployment(tmp_path / "fleet", num_nodes=2) as dep:
        dep.start()
        dep.submit(config)

        def round_one_committed() -> bool:
            found = list(manifests.glob("*/checkpoint.json"))
            return bool(found) and json.loads(found[0].read_text())["server_round"] >= 1

        wait_for(round_one_committed, RUN_TIMEOUT, "the round 1 checkpoint")
        dep.stop_superlink(sig=signal.SIGKILL)
        killed_at = time.time()
        assert json.loads(next(manifests.glob("*/checkpoint.json")).read_text())["server_round"] == 1

        dep.start_superlink()
        dep.app_dir = changed_app(dep.app_dir, tmp_path)
        run_id = dep.submit(config)
        finish(dep, run_id)
        assert all("restarting for a task of app bundle" in p.output() for p in dep.clientapps.values())
    rows = message_rows(out, "flasc")
    for node in {r["node"] for r in rows}:
        before = [r for r in rows if r["node"] == node and r["server_round"] <= 1]
        after = [r for r in rows if r["node"] == node and r["server_round"] == 2]
        assert {r["process_id"] for r in before} == {r["process_id"] for r in after}  # restarted in place
        assert after[0]["process_messages"] == 1 < before[-1]["process_messages"]
    entry = method_entry(out, "flasc")
    rows = entry["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["finished_at"] < killed_at < rows[1]["finished_at"]
    assert entry["checkpoint"]["resumed_from_round"] == 1
    assert json.loads(next(manifests.glob("*/checkpoint.json")).read_text())["server_round"] == 2


def test_tls_and_supernode_authentication(tmp_path: Path, digits) -> None:
    """TLS on every API plus SuperNode authentication: registered nodes run a round; an unregistered key is refused.

    The nodes read their own files (node config `data-path`), as devices of a real fleet would; node 1's
    file lacks its test labels, so node 1 loses the round with that reason and node 0 carries it.
    """
    out = tmp_path / "out"
    shards = tmp_path / "node-data"
    save_node_data(shards / "node-0.npz", digits.client_data(0, 2))
    good = dict(np.load(shards / "node-0.npz"))
    np.savez(shards / "node-1.npz", **{k: v for k, v in good.items() if k != "y_test"})
    with LocalDeployment(tmp_path / "fleet", num_nodes=2, secure=True, node_data=shards) as dep:
        dep.start()
        assert dep.credentials is not None
        intruder = dep.start_supernode(0, key=dep.credentials.node_keys[2][0], max_retries=2, name="intruder")
        run_id = dep.submit(small_run(out, 2, method="lora-fedavg", **{"num-server-rounds": 1, "round-timeout": 240.0}))
        wait_for(lambda: not intruder.alive(), 120, "the unregistered SuperNode to give up")
        assert intruder.popen.returncode != 0
        assert log_has(intruder, "Failed to activate SuperNode")
        assert dep.superlink is not None and log_has(dep.superlink, "No SuperNode found with the given public key")
        nodes = json.loads(dep.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]
        assert len(nodes) == 2
        finish(dep, run_id)
        assert "lacks y_test" in dep.logs_of(run_id)
    rounds = method_entry(out, "lora-fedavg")["rounds"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["clients"] == 1


def test_flowers_process_per_message_isolation(tmp_path: Path) -> None:
    """`deploy-local --isolation subprocess`: Flower's stock mode, a fresh ClientApp process for every message."""
    out = tmp_path / "out"
    results = run_local(tmp_path / "fleet", 1, small_run(out, 1, method="lora-fedavg", **{"num-server-rounds": 1}),
                        isolation="subprocess", timeout=RUN_TIMEOUT)
    deployment = results["deployment"]
    assert deployment["status"] == "finished:completed" and deployment["isolation"] == "subprocess"
    overhead = deployment["per_message_overhead_s"]
    assert overhead["count"] == 3 and overhead["most_messages_per_process"] == 1  # base, training, evaluation
    assert all(r["process_messages"] == 1 for r in message_rows(out, "lora-fedavg"))
    assert "push->work" in (Path(deployment["logs"]) / "serverapp.log").read_text()
