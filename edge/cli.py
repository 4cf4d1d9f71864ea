"""`fedge export`, `fedge registry ...` and `fedge edge ...`: artifacts, the registry, and edge agents.

Light at import (typer and rich only): each command imports what it drives, so
`fedge edge agent` never loads torch. `fedge.edge.fleet` launches the registry
and the agents through these same commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.console import console

registry_app = typer.Typer(help="The model registry that publishes signed artifacts to edge agents.", no_args_is_help=True)
edge_app = typer.Typer(help="Edge devices: the agent, and a local fleet deployment.", no_args_is_help=True)

RegistryAddress = Annotated[str, typer.Option(help="HOST:PORT of the registry")]
RootCertificates = Annotated[Path | None, typer.Option(help="the registry's CA (PEM, e.g. ca.crt): connect over TLS")]


def export_cmd(
    out: Annotated[Path, typer.Option(help="folder for model.onnx, model.int8.onnx, model.fp16.onnx, export.json")] = Path("fedge-out/export"),
    scenario: str = "digits-shift",
    weights: Annotated[Path | None, typer.Option(help="state dict (.safetensors or torch) to load into the model")] = None,
    adapter: Annotated[Path | None, typer.Option(help="a peft adapter folder to merge in (a run's OUT/adapters/METHOD)")] = None,
    int8_mode: Annotated[str, typer.Option(help="qdq (calibrated, TensorRT-ready) or dynamic")] = "qdq",
    fp16: Annotated[bool, typer.Option(help="also write an FP16 variant")] = True,
) -> None:
    """Export a model to ONNX (checked against PyTorch), with INT8 and FP16 variants (a causal LM: fp32 and INT8)."""
    from fedge.edge.export import export

    report = export(out, scenario=scenario, weights=weights, int8_mode=int8_mode, fp16=fp16, adapter=adapter)
    if report.get("task") == "causal-lm":
        quality = (f"perplexity {report['fp32_perplexity']:.2f} (next-token acc {report['fp32_next_token_accuracy']:.4f}); "
                   f"int8 {report['int8_bytes_ratio']:.1%} of fp32, perplexity {report['int8_perplexity']:.2f}")
    else:
        quality = (f"acc {report['fp32_accuracy']:.4f}; int8 {report['int8_bytes_ratio']:.1%} of fp32, acc "
                   f"{report['int8_accuracy']:.4f}")
    console.print(f"max |ONNX - PyTorch| {report['max_abs_diff_vs_torch']:.2e}; fp32 {report['fp32_bytes'] / 1e3:.0f} KB "
                  f"{quality}; wrote {out}")


@registry_app.command("serve")
def registry_serve(
    workdir: Annotated[Path, typer.Option(help="artifacts, keys, telemetry and samples")] = Path("fedge-out/registry"),
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port; `REGISTRY HOST:PORT` and `PUBLIC_KEY PATH` are printed")] = 50051,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key PEM (default WORKDIR/registry.pem, created)")] = None,
    publish: Annotated[Path | None, typer.Option(help="an ONNX file to publish as the first version")] = None,
    tls_certificate: Annotated[Path | None, typer.Option(help="PEM certificate (e.g. `fedge certs`' server.pem): TLS only")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its PEM private key (server.key)")] = None,
) -> None:
    """Serve the registry over gRPC until interrupted; publishing needs FEDGE_PUBLISH_TOKEN."""
    from fedge.edge.registry import serve

    serve(workdir, host, port, key, publish=publish, tls_certificate=tls_certificate, tls_key=tls_key)


@registry_app.command("publish")
def registry_publish(
    file: Annotated[Path, typer.Argument(help="the artifact (an ONNX file)", exists=True, dir_okay=False)],
    registry: RegistryAddress,
    token: Annotated[str, typer.Option(envvar="FEDGE_PUBLISH_TOKEN", help="the registry's publish token")],
    fmt: Annotated[str, typer.Option("--format", help="onnx, onnx-int8 or onnx-fp16")] = "onnx",
    root_certificates: RootCertificates = None,
) -> None:
    """Publish FILE as the registry's next version; watching agents fetch it."""
    import grpc

    from fedge.edge.publish import publish

    try:
        reply = publish(registry, token, file.read_bytes(), fmt, {"source": file.name},
                        root_certificates=root_certificates)
    except grpc.RpcError as err:
        console.print(f"[red]not published[/red]: {err.code().name}: {err.details()}")
        raise typer.Exit(1) from err
    console.print(f"published v{reply.version}: {reply.bytes} bytes, sha256 {reply.sha256}")


@registry_app.command("status")
def registry_status(registry: RegistryAddress, root_certificates: RootCertificates = None) -> None:
    """The registry's fleet: each device's tier, runtime, serving version and when it was last seen."""
    import grpc
    from rich.table import Table

    from fedge.edge.publish import fleet_status

    try:
        status = fleet_status(registry, root_certificates=root_certificates)
    except grpc.RpcError as err:
        console.print(f"[red]no status[/red]: {err.code().name}: {err.details()}")
        raise typer.Exit(1) from err
    table = Table(title=f"{registry}: latest v{status.latest_version}, {len(status.devices)} device(s)",
                  title_justify="left")
    for column in ("device", "tier", "runtime", "serving", "last seen"):
        table.add_column(column)
    now = time.time()
    for device in status.devices:
        serving = f"v{device.last_telemetry.serving_version}" if device.HasField("last_telemetry") else "-"
        table.add_row(device.profile.device_id, device.profile.tier, device.profile.runtime, serving,
                      f"{max(now - device.last_seen_unix, 0.0):.1f} s ago")
    console.print(table)


@edge_app.command("agent")
def edge_agent(
    registry: RegistryAddress,
    public_key: Annotated[Path, typer.Option(help="the registry's public key (PEM), pinned")],
    device_id: Annotated[str, typer.Option(help="this device's id")] = "edge-0",
    workdir: Annotated[Path, typer.Option(help="downloads, verified models, last good model")] = Path("fedge-out/edge"),
    data: Annotated[Path | None, typer.Option(help=".npz with x (and y) to serve and canary on")] = None,
    tier: str = "mid",
    runtime: Annotated[str | None, typer.Option(help="tensorrt, onnxruntime-tensorrt, -cuda or -cpu (default: best)")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds to run (default: until interrupted)")] = None,
    root_certificates: RootCertificates = None,
    # Unset options keep the agent's own defaults (fedge.edge.agent.AgentConfig).
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="bytes per fetched chunk")] = None,
    chunk_delay: Annotated[float | None, typer.Option(help="seconds to wait after each chunk (a slow link)")] = None,
    canary_size: Annotated[int | None, typer.Option(help="local samples a new version must pass first")] = None,
    min_canary_accuracy: Annotated[float | None, typer.Option(help="canary accuracy floor (labelled data)")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="allowed canary accuracy drop vs the serving model")] = None,
    serve_batch: Annotated[int | None, typer.Option(help="samples per request when replaying --data")] = None,
    serve_passes: Annotated[int | None, typer.Option(help="passes over --data per version (0: forever)")] = None,
    report_interval: Annotated[float | None, typer.Option(help="seconds between telemetry reports")] = None,
) -> None:
    """Run an edge agent: watch the registry, verify, canary-check and serve each new version."""
    from fedge.edge.agent import run_agent

    options: dict[str, Any] = {"threads": threads, "chunk_size": chunk_size, "chunk_delay_s": chunk_delay,
                               "canary_size": canary_size, "min_canary_accuracy": min_canary_accuracy,
                               "max_accuracy_drop": max_accuracy_drop, "serve_batch": serve_batch,
                               "serve_passes": serve_passes, "report_interval_s": report_interval}
    run_agent(registry, device_id, public_key=public_key, workdir=workdir, data=data, tier=tier, runtime=runtime,
              duration_s=duration, root_certificates=root_certificates,
              **{k: v for k, v in options.items() if v is not None})


@edge_app.command("deploy")
def edge_deploy(
    devices: Annotated[int, typer.Option(help="edge agents to start (separate processes on loopback)")] = 3,
    scenario: str = "digits-shift",
    workdir: Annotated[Path, typer.Option(help="registry and agents' folders")] = Path("fedge-out/edge-deploy"),
) -> None:
    """Export the scenario's base model and deploy it to a local fleet of edge agents; print the fleet's report."""
    from fedge.edge.fleet import deploy_to_edge
    from fedge.scenario import load_scenario

    sc = load_scenario(scenario)
    report = deploy_to_edge(sc.base_model(), sc.client_data(0, 1).test, devices, workdir)
    console.print_json(json.dumps(report))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.add_typer(registry_app, name="registry")
    app.add_typer(edge_app, name="edge")
