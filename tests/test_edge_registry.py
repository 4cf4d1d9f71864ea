"""The registry's own contract over gRPC: who may publish, what it refuses, chunked fetch from an offset."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from fedge.cli import app
from fedge.edge.artifacts import BundleFile, load_public_key, sha256_hex, verify_file, verify_manifest, write_bundle
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
    reg, address = running
    with pytest.raises(grpc.RpcError) as err:
        publish(address, "wrong", {"fp32": BundleFile(b"model")})
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    formats = {"fp32": BundleFile(b"m" * 3_000_000), "int8": BundleFile(b"q" * 1_500_000, precision="int8"),
               "reference": BundleFile(b"r" * 10, "reference", "")}  # bigger than one gRPC message chunk each
    reply = publish(address, "s3cret", formats, {"k": 1})
    assert reply.version == 1 and reply.bytes == 4_500_010
    assert {f.format: f.bytes for f in reply.formats} == {"fp32": 3_000_000, "int8": 1_500_000, "reference": 10}
    stored = reg.store.read(1)
    assert stored.path("int8").read_bytes() == b"q" * 1_500_000 and stored.manifest.metadata == {"k": 1}
    assert stored.manifest.formats["int8"].precision == "int8" and stored.manifest.formats["reference"].precision == ""
    assert fleet_status(address).latest_version == 1


def test_versions_every_agent_would_refuse_are_refused_at_publish(running) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    with pytest.raises(ValueError, match="weight-only"):
        reg.publish({"fp32": BundleFile(b"payload", "onnx-weights")})
    with pytest.raises(ValueError, match="precision"):
        reg.publish({"fp8": BundleFile(b"model", precision="fp8")})
    with pytest.raises(ValueError, match="at least one model"):
        reg.publish({"reference": BundleFile(b"r", "reference", "")})
    for bad in ({"fp32": BundleFile(b"payload", "tflite")}, {"../escape": BundleFile(b"model")}):
        with pytest.raises(grpc.RpcError) as err:
            publish(address, "s3cret", bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reg.latest_version == 0


def test_fetch_streams_chunks_from_the_offset_and_the_notice_verifies(running) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    data, small = bytes(range(256)) * 4000, b"int8 model"
    version = reg.publish({"fp32": BundleFile(data), "int8": BundleFile(small, precision="int8")}, {"note": "x"})
    with grpc.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeRegistryStub(channel)
        chunks = list(stub.FetchArtifact(edge_pb2.FetchRequest(device_id="d", version=version, offset=1000,
                                                                chunk_size=65536, format="fp32"), timeout=10))
        assert chunks[0].offset == 1000 and all(len(c.data) <= 65536 for c in chunks)
        assert b"".join(c.data for c in chunks) == data[1000:]
        int8 = stub.FetchArtifact(edge_pb2.FetchRequest(device_id="d", version=version, format="int8"), timeout=10)
        assert b"".join(c.data for c in int8) == small
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchArtifact(edge_pb2.FetchRequest(version=version, offset=len(data) + 1, format="fp32"),
                                    timeout=10))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchArtifact(edge_pb2.FetchRequest(version=version, format="fp16"), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "fp32, int8" in (err.value.details() or "")
        notice = next(iter(stub.WatchDeployments(edge_pb2.WatchRequest(device_id="d", known_version=0), timeout=10)))
    manifest = verify_manifest(notice.manifest, notice.signature, load_public_key(reg.public_key_pem))
    verify_file(data, manifest, "fp32")
    verify_file(small, manifest, "int8")
    assert manifest.metadata == {"note": "x"} and reg.fetch_log[0] == ("d", version, "fp32", 1000)


def test_a_tls_registry_serves_only_clients_that_trust_its_ca(tmp_path: Path) -> None:
    """The publish token and the artifacts travel over TLS; plaintext and strange-CA clients get nothing."""
    creds = create_credentials(tmp_path / "certs", nodes=0)
    reg = Registry(tmp_path / "registry", publish_token="s3cret")
    server, port = start(reg, "127.0.0.1", 0, workers=8, tls_certificate=creds.server_cert, tls_key=creds.server_key)
    address = f"127.0.0.1:{port}"
    try:
        assert publish(address, "s3cret", {"fp32": BundleFile(b"m" * 1000)}, root_certificates=creds.ca_cert).version == 1
        assert fleet_status(address, root_certificates=creds.ca_cert).latest_version == 1
        with pytest.raises(grpc.RpcError) as err:
            fleet_status(address, timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = create_credentials(tmp_path / "other", nodes=0)
        with pytest.raises(grpc.RpcError) as err:
            publish(address, "s3cret", {"fp32": BundleFile(b"x")}, timeout=3, root_certificates=stranger.ca_cert)
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
    assert f"published v1: fp32 5000 bytes; manifest sha256 {sha256_hex(stored.canonical)}" in done.output
    entry = stored.manifest.formats["fp32"]
    assert (entry.kind, entry.precision) == ("onnx", "fp32") and stored.manifest.metadata == {"source": "model.onnx"}


def test_cli_publishes_a_version_folder_with_every_format(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    formats = {"fp32": BundleFile(b"m" * 400, metadata={"accuracy": 0.9}), "int8": BundleFile(b"q" * 100, precision="int8"),
               "reference": BundleFile(b"r" * 10, "reference", "")}
    write_bundle(tmp_path / "export", formats, {"architecture": "digits-cnn"})
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.onnx", "model.int8.onnx",
                                                                 "reference.safetensors", "bundle.json"}
    done = CliRunner().invoke(app, ["registry", "publish", str(tmp_path / "export"), "--registry", address],
                              env={"FEDGE_PUBLISH_TOKEN": "s3cret"})
    assert done.exit_code == 0, done.output
    stored = reg.store.read(1)
    assert {n: (f.kind, f.precision, f.bytes) for n, f in stored.manifest.formats.items()} == {
        "fp32": ("onnx", "fp32", 400), "int8": ("onnx", "int8", 100), "reference": ("reference", "", 10)}
    assert stored.manifest.formats["fp32"].metadata == {"accuracy": 0.9}
    assert stored.manifest.metadata == {"architecture": "digits-cnn", "source": "export"}
    empty = CliRunner().invoke(app, ["registry", "publish", str(tmp_path), "--registry", address],
                               env={"FEDGE_PUBLISH_TOKEN": "s3cret"})
    assert empty.exit_code == 1 and "bundle.json" in empty.output and reg.latest_version == 1


def test_cli_status_lists_every_device_with_its_serving_version(running) -> None:  # type: ignore[no-untyped-def]
    reg, address = running
    reg.publish({"fp32": BundleFile(b"m" * 100), "int8": BundleFile(b"q" * 30, precision="int8")})
    with grpc.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeRegistryStub(channel)
        stub.Register(edge_pb2.DeviceProfile(device_id="cam-7", tier="weak", runtime="onnxruntime-cpu",
                                             precisions=["int8", "fp32"],
                                             capabilities=edge_pb2.Capabilities(int8_kernel="pmaddubsw")), timeout=10)
        refused = edge_pb2.DeploymentEvent(version=1, status="format_refused", format="int8", reason="top-1 agreement 0.6")
        stub.ReportTelemetry(edge_pb2.Telemetry(device_id="cam-7", serving_version=1, runtime="onnxruntime-cpu",
                                                format="fp32", events=[refused]), timeout=10)
        stub.Register(edge_pb2.DeviceProfile(device_id="cam-8", tier="strong", runtime="tensorrt"), timeout=10)
    result = CliRunner().invoke(app, ["registry", "status", "--registry", address])
    assert result.exit_code == 0, result.output
    assert "latest v1, 2 device(s)" in result.output
    rows = {cells[0]: cells[1:] for line in result.output.splitlines()
            if (cells := [c.strip() for c in line.strip("│ ").split("│")])[0].startswith("cam-")}
    assert rows["cam-7"][:8] == ["weak", "onnxruntime-cpu", "v1", "fp32", "int8,fp32", "pmaddubsw", "-",
                                 "int8: top-1 agreement 0.6"] and rows["cam-7"][8].endswith("s ago")
    assert rows["cam-8"][:4] == ["strong", "tensorrt", "-", "-"]
    status = fleet_status(address)
    assert [e.format for e in status.devices[0].recent_events] == ["int8"]  # cam-7's, kept by the registry
