"""`fedge export`, `fedge registry ...` and `fedge edge ...`: artifacts, the registry, and edge agents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console

registry_app = typer.Typer(help="The model registry that publishes signed artifacts to edge agents.", no_args_is_help=True)
edge_app = typer.Typer(help="Edge devices: the agent, and a local fleet deployment.", no_args_is_help=True)

def export_cmd(
    out: Annotated[Path, typer.Option(help="folder for model.onnx, model.int8.onnx, model.fp16.onnx, export.json")] = Path("fedge-out/export"),
    scenario: str = "digits-shift",
    weights: Annotated[Path | None, typer.Option(help="state dict (.safetensors or torch) to load into the model")] = None,
    int8_mode: Annotated[str, typer.Option(help="qdq (calibrated, TensorRT-ready) or dynamic")] = "qdq",
    fp16: Annotated[bool, typer.Option(help="also write an FP16 variant")] = True,
) -> None:
    """Export a model to ONNX (checked against PyTorch), with INT8 and FP16 variants."""
    from fedge.edge.export import export

    report = export(out, scenario=scenario, weights=weights, int8_mode=int8_mode, fp16=fp16)
    console.print(f"max |ONNX - PyTorch| {report['max_abs_diff_vs_torch']:.2e}; fp32 {report['fp32_bytes'] / 1e3:.0f} KB "
                  f"acc {report['fp32_accuracy']:.4f}; int8 {report['int8_bytes_ratio']:.1%} of fp32, acc "
                  f"{report['int8_accuracy']:.4f}; wrote {out}")




@registry_app.command("serve")
def registry_serve(
    workdir: Annotated[Path, typer.Option(help="artifacts, keys, telemetry and samples")] = Path("fedge-out/registry"),
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port (printed)")] = 50051,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key PEM (default WORKDIR/registry.pem, created)")] = None,
    publish: Annotated[Path | None, typer.Option(help="an ONNX file to publish as the first version")] = None,
    tls_certificate: Annotated[Path | None, typer.Option(help="PEM certificate (e.g. `fedge certs`' server.pem): TLS only")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its PEM private key (server.key)")] = None,
) -> None:
    """Serve the registry over gRPC until interrupted; publishing needs FEDGE_PUBLISH_TOKEN."""
    from fedge.server.registry import serve

    serve(workdir, host, port, key, publish=publish, tls_certificate=tls_certificate, tls_key=tls_key)


@edge_app.command("agent")
def edge_agent(
    registry: Annotated[str, typer.Option(help="HOST:PORT of the registry")],
    public_key: Annotated[Path, typer.Option(help="the registry's public key (PEM), pinned")],
    device_id: Annotated[str, typer.Option(help="this device's id")] = "edge-0",
    workdir: Annotated[Path, typer.Option(help="downloads, verified models, last good model")] = Path("fedge-out/edge"),
    data: Annotated[Path | None, typer.Option(help=".npz with x (and y) to serve and canary on")] = None,
    tier: str = "mid",
    runtime: Annotated[str | None, typer.Option(help="tensorrt, onnxruntime-tensorrt, -cuda or -cpu (default: best)")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds to run (default: until interrupted)")] = None,
    root_certificates: Annotated[Path | None, typer.Option(help="the registry's CA (PEM, e.g. ca.crt): connect over TLS")] = None,
) -> None:
    """Run an edge agent: watch the registry, verify, canary-check and serve each new version."""
    from fedge.edge.agent import main as agent_main

    agent_main(registry, device_id, public_key=public_key, workdir=workdir, data=data, tier=tier, runtime=runtime,
               duration_s=duration, root_certificates=root_certificates)


@edge_app.command("deploy")
def edge_deploy(
    devices: Annotated[int, typer.Option(help="edge agents to start (separate processes on loopback)")] = 3,
    scenario: str = "digits-shift",
    workdir: Annotated[Path, typer.Option(help="registry and agents' folders")] = Path("fedge-out/edge-deploy"),
) -> None:
    """Export the scenario's base model and deploy it to a local fleet of edge agents; print the fleet's report."""
    from fedge.deploy import deploy_to_edge
    from fedge.scenario import load_scenario

    sc = load_scenario(scenario)
    report = deploy_to_edge(sc.base_model(), sc.client_data(0, 1).test, devices, workdir)
    console.print_json(json.dumps(report))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.add_typer(registry_app, name="registry")
    app.add_typer(edge_app, name="edge")
