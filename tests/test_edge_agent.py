"""Edge agents against a real registry over gRPC on loopback: deploy, choose a format, refuse, canary, roll back."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from _edge_support import (
    base_onnx,
    bundle,
    damaged_int8,
    deploy,
    events,
    fp16_of,
    int8_of,
    make_agent,
    onnx_variant,
    reference_of,
    serve_first,
    served_format,
    target_data,
    wait_until,
)

from fedge.edge.artifacts import generate_key, make_manifest, sign_manifest
from fedge.edge.registry import Registry, start
from fedge.edge.runtime import OnnxRuntimeModel
from fedge.protos import edge_pb2
from fedge.server.certs import create_credentials


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {"v1": base_onnx(), "v2": onnx_variant("shifted"), "collapsed": onnx_variant("collapsed")}


def test_agents_receive_and_serve_a_deployment(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agents = [make_agent(tmp_path, address, reg, f"cam-{i}") for i in range(2)]
    try:
        reg.publish(bundle(fp32=models["v1"]), {"note": "first"})
        for agent in agents:
            wait_until(lambda a=agent: a.serving_version == 1, what="v1 to serve")
        reg.publish(bundle(fp32=models["v2"]))
        for agent in agents:
            wait_until(lambda a=agent: a.serving_version == 2, what="v2 to serve")
        x = target_data().tensors[0][:4].numpy()
        logits, version = agents[0].predict(x)
        assert version == 2 and logits.shape == (4, 10) and np.isfinite(logits).all()
        status = wait_until(lambda: [d for d in reg.FleetStatus(None, None).devices
                                     if d.last_telemetry.serving_version == 2 and d.last_telemetry.num_predictions],
                            what="telemetry on v2")
        t = status[0].last_telemetry
        assert t.runtime == "onnxruntime-cpu" and t.latency_p50_ms > 0 and t.HasField("accuracy") and t.mean_entropy > 0
        assert {e["status"] for e in events(reg)} == {"deployed"}
    finally:
        for agent in agents:
            agent.stop()


def test_an_agent_receives_a_deployment_over_tls(tmp_path: Path, models) -> None:  # type: ignore[no-untyped-def]
    creds = create_credentials(tmp_path / "certs", nodes=0)
    reg = Registry(tmp_path / "registry")
    server, port = start(reg, "127.0.0.1", 0, workers=8, tls_certificate=creds.server_cert, tls_key=creds.server_key)
    agent = make_agent(tmp_path, f"localhost:{port}", reg, root_certificates=creds.ca_cert)  # type: ignore[arg-type]
    try:
        serve_first(reg, agent, models["v1"])
    finally:
        agent.stop()
        reg.stop()
        server.stop(grace=0.5).wait()


def test_tampered_and_wrongly_signed_artifacts_are_refused(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agent = make_agent(tmp_path, address, reg)
    try:
        serve_first(reg, agent, models["v1"])
        x = target_data().tensors[0][:8].numpy()
        before, _ = agent.predict(x)
    finally:
        agent.stop()
    # v2: a byte of the stored model flipped after signing (same size, valid signature, wrong sha256). It is
    # damaged while the device is offline, so the device's first look at v2 is at the damaged bytes.
    reg.publish(bundle(fp32=models["v2"]))
    stored = reg.store.read(2).path("fp32")
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    stored.write_bytes(bytes(blob))
    agent = make_agent(tmp_path, address, reg)  # restarts on v1 from disk, then hears of v2
    try:
        assert agent.serving_version == 1
        wait_until(lambda: 2 in agent.rejected, what="tampered v2 to be refused")
        assert "sha256" in agent.rejected[2]

        # v3: a well-formed artifact signed by a key the agent does not trust
        genuine_key, rogue_key = reg.key, generate_key(tmp_path / "rogue.pem")
        reg.key = rogue_key
        reg.publish(bundle(fp32=models["v2"]))
        wait_until(lambda: 3 in agent.rejected, what="wrongly signed v3 to be refused")
        assert "signature" in agent.rejected[3]

        after, served = agent.predict(x)  # the old model keeps answering, unchanged
        assert served == 1
        np.testing.assert_array_equal(before, after)
        wait_until(lambda: sum(e["status"] == "rejected" for e in events(reg)) >= 2, what="rejections reported")
        assert not list((agent.workdir / "models").glob("v000002*")) and not list((agent.workdir / "models").glob("v000003*"))

        # A forged notice for v4 must not block the genuine v4 that follows it.
        forged = make_manifest(4, bundle(fp32=models["v2"]))
        canonical, signature = sign_manifest(forged, rogue_key)
        assert agent.handle_notice(edge_pb2.DeploymentNotice(version=4, manifest=canonical, signature=signature)) == "refused"
        reg.key = genuine_key
        deploy(reg, agent, bundle(fp32=models["v2"]))
    finally:
        agent.stop()


def test_a_damaged_int8_is_refused_by_agreement_and_fp32_keeps_serving(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    """A validly signed INT8 whose weights were scaled: no label and no signature check can catch it, agreement with
    fp32 on the device's own unlabelled inputs does; the device serves fp32 of the same version, no request fails."""
    reg, address = registry
    agent = make_agent(tmp_path, address, reg, labels=False)
    assert agent.precisions[0] == "int8"  # this CPU would take INT8 first
    failures: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def client() -> None:  # a caller of the device's model throughout the deployment
        x = target_data().tensors[0][:1].numpy()
        while not stop.is_set():
            try:
                agent.predict(x)
                answered[0] += 1
            except BaseException as err:  # noqa: BLE001 - every failed request is counted
                failures.append(err)
            stop.wait(0.002)

    caller = threading.Thread(target=client)
    try:
        serve_first(reg, agent, models["v1"])
        assert served_format(agent) == "fp32"
        caller.start()
        assert deploy(reg, agent, bundle(fp32=models["v2"], int8=damaged_int8(int8_of("shifted")))) == "fp32"
        refused = agent.checks[2][0]
        assert refused.format == "int8" and not refused.passed and refused.reference == "device inputs"
        assert refused.agreement is not None and refused.agreement.top1 < 0.95
        assert "disagrees with fp32" in refused.reason and "top-1 agreement" in refused.reason
        status = wait_until(lambda: [d for d in reg.FleetStatus(None, None).devices
                                     if d.last_telemetry.serving_version == 2 and d.last_telemetry.num_predictions],
                            what="telemetry on v2")
        assert status[0].last_telemetry.format == "fp32" and status[0].last_telemetry.num_failures == 0
        event = next(e for e in status[0].recent_events if e.status == "format_refused")
        assert event.format == "int8" and event.agreement.top1 == pytest.approx(refused.agreement.top1)
        assert event.agreement.reference == "device inputs"
    finally:
        stop.set()
        if caller.is_alive():
            caller.join()
        agent.stop()
    assert not failures and answered[0] > 0


def test_a_device_without_data_checks_formats_against_the_signed_reference_set(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agent = make_agent(tmp_path, address, reg, labels=None)
    try:
        v1 = bundle(fp32=models["v1"], int8=damaged_int8(int8_of()), reference=reference_of(models["v1"]))
        assert deploy(reg, agent, v1) == "fp32"
        assert [(c.format, c.passed, c.reference) for c in agent.checks[1]] == [
            ("int8", False, "reference set"), ("fp32", True, "reference set")]
        v2 = bundle(fp32=models["v2"], int8=int8_of("shifted"), reference=reference_of(models["v2"]))
        assert deploy(reg, agent, v2) == "int8"
        chosen = agent.checks[2][-1]
        assert chosen.agreement is not None and chosen.agreement.top1 >= 0.95 and chosen.reference == "reference set"
        reg.publish(bundle(int8=int8_of("shifted")))  # v3: nothing to compare an int8 with
        wait_until(lambda: 3 in agent.rejected, what="an unverifiable int8 to be refused")
        assert "no fp32 reference" in agent.rejected[3] and agent.serving_version == 2
    finally:
        agent.stop()


def test_two_devices_of_different_capabilities_serve_different_formats(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from fedge.cli import app

    reg, address = registry
    cpu = make_agent(tmp_path, address, reg, "cam-cpu")  # what this CPU allows: int8, fp16, fp32
    half = make_agent(tmp_path, address, reg, "cam-fp16", precisions=("fp16", "fp32"))  # declared: fp16 first
    try:
        reg.publish(bundle(fp32=models["v1"], int8=int8_of(), fp16=fp16_of(models["v1"])))
        status = wait_until(lambda: {d.profile.device_id: d for d in reg.FleetStatus(None, None).devices
                                     if d.last_telemetry.serving_version == 1} if all(
            a.serving_version == 1 for a in (cpu, half)) else {}, what="both devices on v1")
        assert {n: s.last_telemetry.format for n, s in status.items()} == {"cam-cpu": "int8", "cam-fp16": "fp16"}
        assert list(status["cam-fp16"].profile.precisions) == ["fp16", "fp32"]
        caps = status["cam-cpu"].profile.capabilities
        assert caps.machine and caps.int8_kernel in ("vnni", "pmaddubsw", "sdot", "neon") and caps.memory_bytes > 0
        assert "CPUExecutionProvider" in caps.providers
        result = CliRunner().invoke(app, ["registry", "status", "--registry", address])
        assert result.exit_code == 0, result.output
        rows = {cells[0]: cells for line in result.output.splitlines()
                if (cells := [c.strip() for c in line.strip("│ ").split("│")])[0].startswith("cam-")}
        assert rows["cam-cpu"][3:6] == ["v1", "int8", "int8,fp16,fp32"]
        assert rows["cam-fp16"][3:6] == ["v1", "fp16", "fp16,fp32"]
    finally:
        cpu.stop()
        half.stop()


def test_a_model_that_fails_its_canary_is_not_served(registry, device, models) -> None:  # type: ignore[no-untyped-def]
    reg, _ = registry
    agent = device
    serve_first(reg, agent, models["v1"])
    reg.publish(bundle(fp32=models["collapsed"]))
    wait_until(lambda: 2 in agent.rejected, what="collapsed v2 to fail its canary")
    assert "canary" in agent.rejected[2] and "collapsed" in agent.rejected[2]
    assert agent.predict(target_data().tensors[0][:2].numpy())[1] == 1
    deploy(reg, agent, bundle(fp32=models["v2"]))  # a good later version still deploys


def test_live_failure_rolls_back_to_the_last_good_model(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agent = make_agent(tmp_path, address, reg)
    try:
        serve_first(reg, agent, models["v1"])
        deploy(reg, agent, bundle(fp32=models["v2"]))

        class Broken:
            runtime = "onnxruntime-cpu"

            def predict(self, x: np.ndarray) -> np.ndarray:
                return np.full((len(x), 10), np.nan, dtype=np.float32)

        served = agent.serving.served
        assert served is not None
        object.__setattr__(served, "model", Broken())  # v2 starts producing NaNs in the field
        wait_until(lambda: agent.serving_version == 1, what="rollback to v1")
        assert "rolled_back" in {e["status"] for e in wait_until(lambda: events(reg) if any(
            e["status"] == "rolled_back" for e in events(reg)) else [], what="rollback reported")}
        assert (agent.workdir / "current").read_text().split() == ["1", "fp32"]
    finally:
        agent.stop()
    again = make_agent(tmp_path, address, reg)  # after a restart, v2 is still the registry's latest
    try:
        assert again.serving_version == 1
        v2 = reg.store.read(2)
        notice = edge_pb2.DeploymentNotice(version=2, manifest=v2.canonical, signature=v2.signature)
        assert again.handle_notice(notice) == "skipped"  # the rolled-back version is not deployed again
        assert again.serving_version == 1
    finally:
        again.stop()


def test_agent_restarts_on_its_last_verified_model(tmp_path: Path, registry, models) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agent = make_agent(tmp_path, address, reg)
    serve_first(reg, agent, models["v1"])
    agent.stop()
    again = make_agent(tmp_path, "127.0.0.1:1", reg)  # registry unreachable: serve from disk
    try:
        assert again.serving_version == 1
        assert again.predict(target_data().tensors[0][:2].numpy())[1] == 1
    finally:
        again.stop()


def test_weight_only_update_is_applied_and_checked_against_its_signed_target(registry, device, models) -> None:  # type: ignore[no-untyped-def]
    from fedge.edge.publish import weight_update

    reg, _ = registry
    agent = device
    serve_first(reg, agent, models["v1"])
    update = weight_update(models["v1"], 1, models["v2"])
    wrong = dataclasses.replace(update, metadata={**update.metadata, "target_sha256": "0" * 64})
    reg.publish({"fp32": wrong})  # v2: target does not match
    wait_until(lambda: 2 in agent.rejected, what="a weight update with a wrong target to be refused")
    assert "artifact refused" in agent.rejected[2] and "hashes to" in agent.rejected[2]
    deploy(reg, agent, {"fp32": update})  # v3: applies to v1 and yields exactly the new model
    assert (agent.workdir / "models" / "v000003" / "fp32.bin").read_bytes() == models["v2"]


def test_an_int8_device_takes_an_int8_weight_update_checked_against_the_reference_set(registry, device, models) -> None:  # type: ignore[no-untyped-def]
    """A device serving INT8 has no fp32 of the new weights: the update's reference set is what it checks against."""
    from fedge.edge.publish import weight_update

    reg, _ = registry
    agent = device
    assert deploy(reg, agent, bundle(fp32=models["v1"], int8=int8_of())) == "int8"
    update = {"int8": weight_update(int8_of(), 1, int8_of("shifted"), "int8")}
    reg.publish(update)  # v2: no reference set, no fp32: nothing to compare with
    wait_until(lambda: 2 in agent.rejected, what="an uncheckable update to be refused")
    assert "no fp32 reference" in agent.rejected[2]
    with_reference = {**update, **bundle(reference=reference_of(models["v2"]))}  # v3: with the new reference set
    assert deploy(reg, agent, with_reference) == "int8"
    assert agent.checks[3][-1].reference == "reference set"
    x = target_data().tensors[0][:16].numpy()  # the quantizer's model, up to the order of its initializers
    np.testing.assert_array_equal(agent.predict(x)[0], OnnxRuntimeModel(int8_of("shifted"), threads=1).predict(x))


def test_uploaded_samples_are_stored_with_their_predictions(registry, device, models) -> None:  # type: ignore[no-untyped-def]
    reg, _ = registry
    agent = device
    serve_first(reg, agent, models["v1"])
    data = target_data()
    x, y = data.tensors[0][:3].numpy(), data.tensors[1][:3].numpy()
    assert agent.upload_samples(x, y) == 3
    stored = list((reg.workdir / "samples" / "cam-0").glob("v000001-*.npz"))
    assert len(stored) == 1
    with np.load(stored[0]) as npz:
        np.testing.assert_array_equal(npz["x1"], x[1])
        assert int(npz["y2"]) == int(y[2])
        assert npz["p0"].shape == (10,) and abs(float(npz["p0"].sum()) - 1.0) < 1e-5
