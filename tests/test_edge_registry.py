"""The registry's own contract over gRPC: who may publish, what it refuses, chunked fetch from an offset."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from fedge.cli import app
from fedge.edge.artifacts import load_public_key, verify_artifact, verify_manifest
from fedge.edge.publish import fleet_status, publish
from fedge.edge.registry import Registry, start
from fedge.protos import edge_pb2, edge_pb2_grpc
from fedge.server.certs import create_credentials


@pytest.fixture
def running(tmp_path: Path):  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path / "registry", publish_token="s3cret")
    server, port = start(reg, "127.0.0.1", 0, workers=8)
    yield reg, f"127.0.0.1:{port}"
    reg.stop()
    server.stop(grace=0.5).wait()


def test_publishing_needs_the_token(running) -> None:  # type: ignore[no-untyped-def]
    _, address = running
    with pytest.raises(grpc.RpcError) as err:
        publish(address, "wrong", b"model")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = publish(address, "s3cret", b"m" * 3_000_000, "onnx", {"k": 1})  # bigger than one gRPC message chunk
    assert reply.version == 1 and reply.bytes == 3_000_000
    assert fleet_status(address).latest_version == 1


def test_a_weight_update_without_its_base_and_target_is_refused(running) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    with pytest.raises(ValueError, match="weight-only"):
        reg.publish(b"payload", {}, fmt="onnx-weights")
    with pytest.raises(grpc.RpcError) as err:
        publish(address, "s3cret", b"payload", "tflite")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reg.latest_version == 0


def test_fetch_streams_chunks_from_the_offset_and_the_notice_verifies(running) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    data = bytes(range(256)) * 4000
    version = reg.publish(data, {"note": "x"})
    with grpc.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeRegistryStub(channel)
        chunks = list(stub.FetchArtifact(edge_pb2.FetchRequest(device_id="d", version=version, offset=1000,
                                                                chunk_size=65536), timeout=10))
        assert chunks[0].offset == 1000 and all(len(c.data) <= 65536 for c in chunks)
        assert b"".join(c.data for c in chunks) == data[1000:]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchArtifact(edge_pb2.FetchRequest(version=version, offset=len(data) + 1), timeout=10))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        notice = next(iter(stub.WatchDeployments(edge_pb2.WatchRequest(device_id="d", known_version=0), timeout=10)))
    manifest = verify_manifest(notice.manifest, notice.signature, load_public_key(reg.public_key_pem))
    verify_artifact(data, manifest)
    assert manifest.metadata == {"note": "x"} and reg.fetch_log[0] == ("d", version, 1000)


def test_a_tls_registry_serves_only_clients_that_trust_its_ca(tmp_path: Path) -> None:
    """The publish token and the artifacts travel over TLS; plaintext and strange-CA clients get nothing."""
    creds = create_credentials(tmp_path / "certs", nodes=0)
    reg = Registry(tmp_path / "registry", publish_token="s3cret")
    server, port = start(reg, "127.0.0.1", 0, workers=8, tls_certificate=creds.server_cert, tls_key=creds.server_key)
    address = f"127.0.0.1:{port}"
    try:
        assert publish(address, "s3cret", b"m" * 1000, root_certificates=creds.ca_cert).version == 1
        assert fleet_status(address, root_certificates=creds.ca_cert).latest_version == 1
        with pytest.raises(grpc.RpcError) as err:
            fleet_status(address, timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = create_credentials(tmp_path / "other", nodes=0)
        with pytest.raises(grpc.RpcError) as err:
            publish(address, "s3cret", b"x", timeout=3, root_certificates=stranger.ca_cert)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reg.latest_version == 1
    finally:
        reg.stop()
        server.stop(grace=0.5).wait()


def test_cli_publishes_a_file_with_the_token_from_the_environment(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    model = tmp_path / "model.onnx"
    model.write_bytes(b"m" * 5000)
    command = ["registry", "publish", str(model), "--registry", address]
    denied = CliRunner().invoke(app, command, env={"FEDGE_PUBLISH_TOKEN": "wrong"})
    assert denied.exit_code == 1 and "PERMISSION_DENIED" in denied.output and reg.latest_version == 0
    done = CliRunner().invoke(app, command, env={"FEDGE_PUBLISH_TOKEN": "s3cret"})
    assert done.exit_code == 0, done.output
    stored = reg.store.read(1)
    assert f"published v1: 5000 bytes, sha256 {stored.manifest.sha256}" in done.output
    assert stored.manifest.format == "onnx" and stored.manifest.metadata == {"source": "model.onnx"}


def test_cli_status_lists_every_device_with_its_serving_version(running) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    reg.publish(b"m" * 100)
    with grpc.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeRegistryStub(channel)
        stub.Register(edge_pb2.DeviceProfile(device_id="cam-7", tier="weak", runtime="onnxruntime-cpu"), timeout=10)
        stub.ReportTelemetry(edge_pb2.Telemetry(device_id="cam-7", serving_version=1, runtime="onnxruntime-cpu"),
                             timeout=10)
        stub.Register(edge_pb2.DeviceProfile(device_id="cam-8", tier="strong", runtime="tensorrt"), timeout=10)
    result = CliRunner().invoke(app, ["registry", "status", "--registry", address])
    assert result.exit_code == 0, result.output
    assert "latest v1, 2 device(s)" in result.output
    rows = {cells[0]: cells[1:] for line in result.output.splitlines()
            if (cells := [c.strip() for c in line.strip("│ ").split("│")])[0].startswith("cam-")}
    assert rows["cam-7"][:4] == ["weak", "onnxruntime-cpu", "v1", "-"] and rows["cam-7"][4].endswith("s ago")
    assert rows["cam-8"][:3] == ["strong", "tensorrt", "-"]
