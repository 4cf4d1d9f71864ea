"""`fedge export`, `fedge registry ...` and `fedge edge ...`: artifacts, the registry, and edge agents.

Light at import (typer and rich only): each command imports what it drives, so
`fedge edge agent` never loads torch. `fedge.edge.fleet` launches the registry
and the agents through these same commands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.console import console, progress_bars
from fedge.errors import UserError

if TYPE_CHECKING:
    from fedge.edge.export import ExportSource

#: finds a finished run's model: (its --out folder, a method, or a checkpoint folder) -> what to export or deploy.
#: The top-level CLI supplies it (rebuilding a method's model needs the methods, which the edge never imports).
RunSource = Callable[[Path | None, str | None, Path | None], "ExportSource"]
_run_source: RunSource | None = None


class Int8Mode(str, Enum):
    qdq = "qdq"
    dynamic = "dynamic"

registry_app = typer.Typer(help="The model registry that publishes signed artifacts to edge agents.", no_args_is_help=True)
edge_app = typer.Typer(help="Edge devices: the agent, and a local fleet deployment.", no_args_is_help=True)

RegistryAddress = Annotated[str, typer.Option(help="HOST:PORT of the registry")]
RootCertificates = Annotated[Path | None, typer.Option(
    help="the registry's CA (PEM, e.g. ca.crt): connect over TLS", exists=True, dir_okay=False)]


def export_cmd(
    out: Annotated[Path | None, typer.Option(
        help="the version's folder: model.onnx, model.int8.onnx, model.fp16.onnx, reference.safetensors, "
             "bundle.json, export.json, samples.npz (default FROM/export, else fedge-out/export)")] = None,
    from_run: Annotated[Path | None, typer.Option(
        "--from", help="a run's --out folder (`fedge run`, `fedge deploy-local`): export its federated model")] = None,
    method: Annotated[str | None, typer.Option(help="with --from: whose model (default: the run's first method)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="a checkpoint folder (OUT/checkpoints/METHOD-HASH): export the model it holds")] = None,
    scenario: Annotated[str, typer.Option(help="without --from/--checkpoint: export this scenario's base model")] = "digits-shift",
    weights: Annotated[Path | None, typer.Option(
        help="a state dict (.safetensors or torch) to load into the scenario's base model")] = None,
    adapter: Annotated[Path | None, typer.Option(
        help="a peft adapter folder to merge into the scenario's base model (a run's OUT/adapters/METHOD)")] = None,
    int8_mode: Annotated[Int8Mode, typer.Option(help="qdq (calibrated, TensorRT-ready) or dynamic")] = Int8Mode.qdq,
    fp16: Annotated[bool, typer.Option(help="also write an FP16 format")] = True,
    tensorrt_plans: Annotated[bool, typer.Option(help="also build TensorRT engine plans for this machine's GPU "
                                                      "(where TensorRT can build)")] = False,
) -> None:
    """Export a model as one publishable version: ONNX fp32 (checked against PyTorch), INT8, FP16 and a reference
    set; a run's federated model (--from OUT, or --checkpoint) or a scenario's base model. A causal LM: fp32 and
    INT8, with their held-out perplexity."""
    from fedge.edge.capabilities import describe
    from fedge.edge.export import export
    from fedge.outputs import EXPORT, check_out_dir

    source_out = check_out_dir(out if out is not None else (from_run or Path("fedge-out")) / EXPORT)
    with progress_bars():
        source = model_source(from_run, method, checkpoint, scenario, weights, adapter)
        summary = export(source_out, source, int8_mode=int8_mode.value, fp16=fp16, tensorrt_plans=tensorrt_plans)
    what = (f"{summary['method']} after round {summary['round']} (federated accuracy {summary['federated_accuracy']:.4f})"
            if summary.get("model") == "federated" else f"{summary['scenario']} {summary['model']} model")
    if summary.get("task") == "causal-lm":
        quality = (f"perplexity {summary['fp32_perplexity']:.2f} (next-token accuracy "
                   f"{summary['fp32_next_token_accuracy']:.4f}); int8 {summary['int8_bytes_ratio']:.1%} of fp32, "
                   f"perplexity {summary['int8_perplexity']:.2f}")
    else:
        quality = (f"accuracy {summary['fp32_accuracy']:.4f}; int8 {summary['int8_bytes_ratio']:.1%} of fp32, accuracy "
                   f"{summary['int8_accuracy']:.4f}, top-1 agreement with fp32 {summary['int8_agreement_vs_fp32']:.4f} "
                   f"(on {describe(summary['host'])})")
    console.print(f"exported {what}: fp32 {summary['fp32_bytes'] / 1e3:.0f} KB, max |ONNX - PyTorch| "
                  f"{summary['max_abs_diff_vs_torch']:.2e}, {quality}; wrote {source_out}")

def model_source(from_run: Path | None, method: str | None, checkpoint: Path | None, scenario: str,
                 weights: Path | None, adapter: Path | None = None) -> ExportSource:
    """What to export or deploy: a run's model (--from / --checkpoint) or a scenario's base model (--weights,
    --adapter)."""
    from fedge.edge.export import scenario_source

    if sum(x is not None for x in (from_run, checkpoint, weights, adapter)) > 1:
        raise typer.BadParameter("give one of --from, --checkpoint, --weights and --adapter", param_hint="--from")
    if method is not None and from_run is None:
        raise typer.BadParameter("--method picks a method of a run: give the run with --from", param_hint="--method")
    if from_run is None and checkpoint is None:
        return scenario_source(scenario, weights, adapter=adapter)
    if _run_source is None:
        raise UserError("this command line was built without access to runs", "run it as `fedge ...`")
    return _run_source(from_run, method, checkpoint)


@registry_app.command("serve")
def registry_serve(
    workdir: Annotated[Path, typer.Option(help="artifacts, keys, telemetry and samples")] = Path("fedge-out/registry"),
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535,
                                      help="0 picks a free port; `REGISTRY HOST:PORT` and `PUBLIC_KEY PATH` are printed")] = 50051,
    key: Annotated[Path | None, typer.Option(
        help="Ed25519 private key PEM (default WORKDIR/registry.pem, created)", dir_okay=False)] = None,
    publish: Annotated[Path | None, typer.Option(
        help="a version folder (`fedge export`) or an fp32 ONNX file to publish as the first version",
        exists=True)] = None,
    tls_certificate: Annotated[Path | None, typer.Option(
        help="PEM certificate (e.g. `fedge certs`' server.pem): TLS only", exists=True, dir_okay=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its PEM private key (server.key)", exists=True, dir_okay=False)] = None,
) -> None:
    """Serve the registry over gRPC until interrupted; publishing needs FEDGE_PUBLISH_TOKEN."""
    from fedge.edge.registry import serve
    from fedge.outputs import check_out_dir

    if (tls_certificate is None) != (tls_key is None):
        raise typer.BadParameter("TLS needs both --tls-certificate and --tls-key", param_hint="--tls-key")
    serve(check_out_dir(workdir, "--workdir"), host, port, key, publish=publish, tls_certificate=tls_certificate,
          tls_key=tls_key)


@registry_app.command("publish")
def registry_publish(
    path: Annotated[Path, typer.Argument(help="a version folder written by `fedge export` (every format in its "
                                              "bundle.json), or one fp32 ONNX file", exists=True)],
    registry: RegistryAddress,
    token: Annotated[str, typer.Option(envvar="FEDGE_PUBLISH_TOKEN", help="the registry's publish token")],
    root_certificates: RootCertificates = None,
) -> None:
    """Publish PATH as the registry's next version; watching agents fetch the format each one takes."""
    import grpc

    from fedge.edge.artifacts import ArtifactError, read_bundle
    from fedge.edge.publish import publish

    try:
        formats, metadata = read_bundle(path)
        reply = publish(registry, token, formats, metadata, root_certificates=root_certificates)
    except ArtifactError as err:
        raise UserError(f"not published: {err}", "give a folder `fedge export` wrote, or an ONNX file") from err
    except grpc.RpcError as err:
        raise registry_error(registry, err, "not published") from err
    listed = ", ".join(f"{f.format} {f.bytes}" for f in reply.formats)
    console.print(f"published v{reply.version}: {listed} bytes; manifest sha256 {reply.sha256}")


def registry_error(registry: str, err: Any, what: str) -> UserError:
    """A failed call to the registry (`err`: a grpc.RpcError), said in the user's terms."""
    import grpc

    code, details = err.code(), err.details()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UserError(f"{what}: the registry at {registry} is not reachable ({code.name}: {details})",
                         "start it with `fedge registry serve`, or check --registry (and --root-certificates for TLS)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return UserError(f"{what}: the registry refused the publish token ({code.name}: {details})",
                         "give the token it was started with (--token or FEDGE_PUBLISH_TOKEN)")
    return UserError(f"{what}: {code.name}: {details}", "see the registry's log")


@registry_app.command("status")
def registry_status(
    registry: RegistryAddress,
    root_certificates: RootCertificates = None,
    wait: Annotated[float, typer.Option(
        min=0, help="seconds to keep asking until the registry answers (and --devices serve its latest version)")] = 0.0,
    devices: Annotated[int, typer.Option(
        min=0, help="with --wait: also wait until this many devices serve the latest version")] = 0,
) -> None:
    """The registry's fleet: each device's tier, runtime, CPU, the version and format it serves, its accuracy, what
    it refused of that version, and when it was last seen."""
    import grpc
    from rich.table import Table

    from fedge.edge.publish import fleet_status

    deadline = time.monotonic() + wait
    while True:
        try:
            status = fleet_status(registry, root_certificates=root_certificates)
            serving = [d for d in status.devices if d.HasField("last_telemetry")
                       and d.last_telemetry.serving_version == status.latest_version > 0]
            if len(serving) >= devices or time.monotonic() > deadline:
                break
        except grpc.RpcError as err:
            if time.monotonic() > deadline:
                raise registry_error(registry, err, "no status") from err
        time.sleep(0.5)
    table = Table(title=f"{registry}: latest v{status.latest_version}, {len(status.devices)} device(s)",
                  title_justify="left")
    for column in ("device", "tier", "runtime", "serving", "format", "takes", "int8 kernel", "accuracy", "refused",
                   "last seen"):
        table.add_column(column)
    now = time.time()
    for device in status.devices:
        telemetry = device.last_telemetry if device.HasField("last_telemetry") else None
        version = telemetry.serving_version if telemetry else 0
        refused = [f"{e.format or f'v{e.version}'}: {e.reason}" for e in device.recent_events
                   if e.status in ("format_refused", "rejected") and e.version >= version]
        table.add_row(device.profile.device_id, device.profile.tier, device.profile.runtime,
                      f"v{version}" if telemetry else "-", (telemetry.format if telemetry else "") or "-",
                      ",".join(device.profile.precisions) or "-", device.profile.capabilities.int8_kernel or "-",
                      f"{telemetry.accuracy:.4f}" if telemetry and telemetry.HasField("accuracy") else "-",
                      "; ".join(refused) or "-", f"{max(now - device.last_seen_unix, 0.0):.1f} s ago")
    console.print(table)
    if len(serving) < devices:
        raise UserError(f"after {wait:.0f}s, {len(serving)} of the {devices} devices asked for serve "
                        f"v{status.latest_version}", "see the agents' logs")


@edge_app.command("agent")
def edge_agent(
    registry: RegistryAddress,
    public_key: Annotated[Path, typer.Option(help="the registry's public key (PEM), pinned", exists=True, dir_okay=False)],
    device_id: Annotated[str, typer.Option(help="this device's id")] = "edge-0",
    workdir: Annotated[Path, typer.Option(help="downloads, verified models, last good model")] = Path("fedge-out/edge"),
    data: Annotated[Path | None, typer.Option(help=".npz with x (and y) to serve and canary on", exists=True, dir_okay=False)] = None,
    tier: str = "mid",
    runtime: Annotated[str | None, typer.Option(help="tensorrt, onnxruntime-tensorrt, -cuda or -cpu (default: best)")] = None,
    precisions: Annotated[str | None, typer.Option(
        help="the precisions this device takes, in the order it tries them, e.g. int8,fp32 "
             "(default: what its runtime and CPU allow)")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds to run (default: until interrupted)")] = None,
    root_certificates: RootCertificates = None,
    # Unset options keep the agent's own defaults (fedge.edge.agent.AgentConfig).
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="bytes per fetched chunk")] = None,
    chunk_delay: Annotated[float | None, typer.Option(help="seconds to wait after each chunk (a slow link)")] = None,
    canary_size: Annotated[int | None, typer.Option(help="local samples a new version must pass first")] = None,
    min_canary_accuracy: Annotated[float | None, typer.Option(help="canary accuracy floor (labelled data)")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="allowed canary accuracy drop vs the serving model")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="a format's least top-1 agreement with fp32")] = None,
    max_logit_diff: Annotated[float | None, typer.Option(
        help="a format's largest |logit diff| from fp32, as a share of fp32's logit range")] = None,
    serve_batch: Annotated[int | None, typer.Option(help="samples per request when replaying --data")] = None,
    serve_passes: Annotated[int | None, typer.Option(help="passes over --data per version (0: forever)")] = None,
    report_interval: Annotated[float | None, typer.Option(help="seconds between telemetry reports")] = None,
    adapter_updates: Annotated[bool | None, typer.Option(
        "--adapter-updates/--no-adapter-updates",
        help="serve a version's unmerged graph first, so later versions arrive as adapter updates (default: on)")] = None,
    adapter_mode: Annotated[str | None, typer.Option(
        help="an unmerged graph on ONNX Runtime: auto (measured here), unmerged (adapters per run) or merged "
             "(folded into the base weights here)")] = None,
) -> None:
    """Run an edge agent: watch the registry, verify each new version, choose and check its format, serve it."""
    from fedge.edge.adapters.serving import MODES
    from fedge.edge.agent import run_agent
    from fedge.outputs import check_out_dir

    if adapter_mode is not None and adapter_mode not in MODES:
        raise typer.BadParameter(f"{adapter_mode!r} is not one of {', '.join(MODES)}", param_hint="--adapter-mode")
    workdir = check_out_dir(workdir, "--workdir")
    options: dict[str, Any] = {"threads": threads, "chunk_size": chunk_size, "chunk_delay_s": chunk_delay,
                               "canary_size": canary_size, "min_canary_accuracy": min_canary_accuracy,
                               "max_accuracy_drop": max_accuracy_drop, "min_agreement": min_agreement,
                               "max_logit_diff": max_logit_diff, "serve_batch": serve_batch,
                               "serve_passes": serve_passes, "report_interval_s": report_interval,
                               "adapter_updates": adapter_updates, "adapter_mode": adapter_mode}
    declared = tuple(p.strip() for p in precisions.split(",") if p.strip()) if precisions else None
    run_agent(registry, device_id, public_key=public_key, workdir=workdir, data=data, tier=tier, runtime=runtime,
              precisions=declared, duration_s=duration, root_certificates=root_certificates,
              **{k: v for k, v in options.items() if v is not None})


@edge_app.command("deploy")
def edge_deploy(
    devices: Annotated[int, typer.Option(min=1, help="edge agents to start (separate processes on loopback)")] = 3,
    from_run: Annotated[Path | None, typer.Option(
        "--from", help="a run's --out folder: deploy its federated model (default: the scenario's base model)")] = None,
    method: Annotated[str | None, typer.Option(help="with --from: whose model (default: the run's first method)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="a checkpoint folder: deploy the model it holds")] = None,
    scenario: Annotated[str, typer.Option(help="without --from/--checkpoint: deploy this scenario's base model")] = "digits-shift",
    workdir: Annotated[Path, typer.Option(help="the registry's and the agents' folders (replaced on each deploy)")] = Path(
        "fedge-out/edge-deploy"),
    precisions: Annotated[list[str] | None, typer.Option(
        help="per device, in order: the precisions it declares, e.g. fp16,fp32 ('' : what its CPU allows)")] = None,
    emulate: Annotated[list[str] | None, typer.Option(
        help="per device, in order: an x86-64 CPU model to run it on under qemu-user, e.g. Haswell-noTSX "
             "(AVX2 without VNNI); '': this machine's CPU")] = None,
) -> None:
    """Export a model, start a registry and DEVICES edge agents on loopback, deploy, and print each device's report."""
    from rich.table import Table
    from torch.utils.data import TensorDataset

    from fedge.edge.fleet import deploy_to_edge
    from fedge.outputs import check_out_dir

    workdir = check_out_dir(workdir, "--workdir")
    with progress_bars():
        source = model_source(from_run, method, checkpoint, scenario, None)
        report = deploy_to_edge(source.model, TensorDataset(source.eval_x, source.eval_y), devices, workdir,
                                precisions=precisions, emulate=emulate, task=source.task)
    origin = source.origin
    what = (f"{origin['method']} (federated, round {origin['round']})" if origin.get("model") == "federated"
            else f"{origin['scenario']} base model")
    artifact = report["artifact"]
    table = Table(title=f"{what}: v{artifact['version']} on {report['deployed']}/{report['devices']} devices "
                        f"(fp32 {report['fp32']['bytes'] / 1e6:.2f} MB)", title_justify="left")
    for column in ("device", "tier", "runtime", "format", "serving", "accuracy", "predictions", "p50 ms"):
        table.add_column(column, justify="left" if column in ("device", "tier", "runtime", "format") else "right")
    for name, device in report["fleet"].items():
        table.add_row(name, device["tier"], device["runtime"], device["format"] or "-", f"v{device['version']}",
                      "-" if device["accuracy"] is None else f"{device['accuracy']:.4f}", str(device["predictions"]),
                      f"{device['p50_latency_ms']:.2f}")
    console.print(table)
    console.print(f"fleet accuracy {report['accuracy']:.4f}, p50 {report['p50_latency_ms']:.2f} ms; logs in {workdir}")


def register(app: typer.Typer, run_source: RunSource | None = None) -> None:
    """Add `fedge export`, `fedge registry ...` and `fedge edge ...`; `run_source` finds a run's model (`--from`)."""
    global _run_source
    _run_source = run_source
    app.command("export")(export_cmd)
    app.add_typer(registry_app, name="registry")
    app.add_typer(edge_app, name="edge")
