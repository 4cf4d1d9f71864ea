"""The `fedge` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, track
from rich.table import Table

from fedge.methods import METHODS

app = typer.Typer(help="fedge: federated and edge adaptation of models.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: ours against the baseline, measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(width=140)


def _round_table(name: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{name}: per round", title_justify="left")
    for col in ("round", "accuracy", "personalized", "uplink KB", "downlink KB", "clients"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['personalized_accuracy']:.4f}",
                      f"{r['uplink_bytes'] / 1e3:.1f}", f"{r['downlink_bytes'] / 1e3:.1f}", str(r["clients"]))
    return table


def _final_table(results: dict[str, Any]) -> Table:
    base = results["base"]["accuracy"]
    table = Table(title=f"final (base model accuracy {base:.4f})", title_justify="left")
    for col in ("method", "accuracy", "vs base", "personalized", "bottom decile", "uplink MB", "downlink MB",
                "trainable", "seconds"):
        table.add_column(col, justify="right")
    for name, entry in results["methods"].items():
        f = entry["final"]
        table.add_row(name, f"{f['accuracy']:.4f}", f"{100 * (f['accuracy'] - base):+.1f} pt",
                      f"{f['personalized_accuracy']:.4f}", f"{f['bottom_decile_accuracy']:.4f}",
                      f"{f['uplink_bytes'] / 1e6:.3f}", f"{f['downlink_bytes'] / 1e6:.3f}",
                      f"{f['trainable_params']:,} ({100 * f['trainable_params'] / f['total_params']:.1f}%)",
                      f"{f['seconds']:.1f}")
    return table


def _run_config_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `k=v` pairs the way `flwr run --run-config` does, and refuse keys fedge does not know."""
    from flwr.common.config import parse_config_args

    from fedge.runconfig import RunSettings

    overrides = parse_config_args(items)
    unknown = sorted(k for k in overrides if k.replace("-", "_") not in RunSettings.__dataclass_fields__)
    if unknown:
        raise typer.BadParameter(f"unknown run-config keys {unknown}", param_hint="--run-config")
    try:
        RunSettings.from_config(overrides)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--run-config") from err
    return overrides


@app.command()
def run(
    methods: Annotated[str, typer.Option(help=f"comma-separated; known: {','.join(METHODS)}")] = "lora-fedavg,full-fedavg",
    rounds: Annotated[int, typer.Option(help="server rounds")] = 10,
    clients: Annotated[int | None, typer.Option(help="virtual clients (default 8, --quick 6)")] = None,
    clients_per_round: Annotated[int, typer.Option(help="clients sampled per round (0: all)")] = 0,
    seed: int = 0,
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew concentration")] = 0.5,
    scenario: str = "digits-shift",
    local_epochs: int = 3,
    lr: Annotated[float, typer.Option(help="local learning rate (0: each method's default)")] = 0.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    out: Annotated[Path, typer.Option(help="output folder for results.json and the plot")] = Path("fedge-out"),
    quick: Annotated[bool, typer.Option(help="a small run that finishes in minutes on 2 CPU cores")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoints in OUT/checkpoints instead of starting over")] = False,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", help="Flower-style overrides, e.g. \"density-up=0.0625 server-opt='adamw'\" (repeatable)")] = None,
    edge_devices: Annotated[int, typer.Option(
        help="edge agents (separate processes on loopback) that receive the first method's final model; 0: none")] = 2,
) -> None:
    """Run federations of the given methods on a scenario, with Flower's simulation runtime, then deploy to the edge."""
    from fedge.results import PLOT_FILE, RESULTS_FILE, load_results, plot_accuracy_vs_uplink, write_results
    from fedge.simulation import simulate

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; known: {sorted(METHODS)}", param_hint="--methods")
    clients = clients or (6 if quick else 8)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    if results_path.exists():
        results_path.unlink()  # a run's results.json describes that run only
    common = {"num-server-rounds": rounds, "num-clients": clients, "clients-per-round": clients_per_round,
              "seed": seed, "alpha": alpha, "scenario": scenario, "local-epochs": local_epochs, "lr": lr,
              "device": device, "out-dir": str(out), "checkpoint": "auto" if resume else "fresh"}
    if run_config:
        common.update(_run_config_overrides(run_config))
    started = time.perf_counter()
    outcomes: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), console=console) as progress:
        for name in names:
            task = progress.add_task(f"{name:>12}", total=rounds, acc="")
            rows: list[dict[str, Any]] = []

            def on_round(_: str, row: dict[str, Any], task: Any = task, rows: list = rows) -> None:
                rows.append(row)
                progress.update(task, advance=1, acc=f"acc {row['accuracy']:.3f}  up {row['uplink_bytes'] / 1e3:.0f} KB")

            outcomes[name] = simulate({**common, "method": name}, on_round=on_round)
            progress.console.print(_round_table(name, rows))
    results = load_results(out)
    if edge_devices > 0:
        results["edge"] = _deploy_final({**common, "method": names[0]}, outcomes[names[0]].arrays, edge_devices, out)
    results["run"] = {"methods": names, "rounds": rounds, "clients": clients, "seconds": time.perf_counter() - started}
    write_results(out, results)
    plot = plot_accuracy_vs_uplink(results, out / PLOT_FILE)
    console.print(_final_table(results))
    for name, entry in results.get("methods", {}).items():
        share = entry.get("uplink", {}).get("budget_weighted_dense_bytes")
        if share:  # sparsity budgets: what the method sent against what its budgets allow of a dense upload
            sent = entry["uplink"]["bytes"]
            console.print(f"{name}: uplink {sent / 1e6:.1f} MB = {sent / share:.3f} of its budget-weighted dense share "
                          f"({share / 1e6:.1f} MB)")
    console.print(f"wrote {results_path} and {plot}")


def _deploy_final(config: dict[str, Any], arrays: Any, devices: int, out: Path) -> dict[str, Any]:
    """Export the run's final model and push it to `devices` edge agents; returns results.json's "edge" entry."""
    from fedge.deploy import deploy_to_edge
    from fedge.handoff import final_model, fleet_test_data

    with console.status(f"{config['method']}: exporting and deploying to {devices} edge agents"):
        edge = deploy_to_edge(final_model(config, arrays), fleet_test_data(config), devices, out / "edge")
    art = edge["artifact"]
    console.print(f"edge: {edge['deployed']}/{edge['devices']} agents serve {config['method']} on {edge['runtime']}; "
                  f"ONNX {art['bytes'] / 1e6:.2f} MB (max |onnx - torch| {art['max_abs_diff_vs_torch']:.1e}), "
                  f"int8 {edge['int8']['bytes'] / 1e6:.2f} MB at accuracy {edge['int8']['accuracy']:.4f}; "
                  f"fleet accuracy {edge['accuracy']:.4f}, p50 {edge['p50_latency_ms']:.2f} ms")
    return edge


@app.command("deploy-local")
def deploy_local(
    method: Annotated[str, typer.Option(help=f"one of: {','.join(METHODS)}")] = "lora-fedavg",
    rounds: int = 3,
    clients: Annotated[int, typer.Option(help="SuperNodes to start (one partition each)")] = 3,
    local_epochs: int = 1,
    out: Annotated[Path, typer.Option(help="output folder for results.json; checkpoints go to OUT/checkpoints")] = Path("fedge-out"),
    secure: Annotated[bool, typer.Option(help="TLS on every API and SuperNode authentication (fresh certificates)")] = False,
    round_timeout: Annotated[float, typer.Option(help="seconds a round waits for replies")] = 300.0,
    min_replies: Annotated[float, typer.Option(help="replies a round needs: below 1 a fraction, else a count")] = 0.5,
    checkpoint: Annotated[str, typer.Option(help="auto (resume), fresh or off")] = "auto",
    workdir: Annotated[Path | None, typer.Option(help="logs, Flower state and certificates (default OUT/deployment)")] = None,
    timeout: Annotated[float, typer.Option(help="give up on the run after this many seconds")] = 3600.0,
    node_data: Annotated[Path | None, typer.Option(help="folder of node-<i>.npz (`fedge node-data`): each node trains on its own file")] = None,
) -> None:
    """Run one federation on Flower's deployment runtime: a SuperLink and N SuperNodes on loopback, via `flwr run`."""
    from fedge.local_deployment import run_local

    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; known: {sorted(METHODS)}", param_hint="--method")
    out = out.resolve()
    config = {"method": method, "num-server-rounds": rounds, "local-epochs": local_epochs, "out-dir": str(out),
              "round-timeout": round_timeout, "min-replies": min_replies, "checkpoint": checkpoint}
    with console.status(f"{method}: SuperLink + {clients} SuperNodes, {rounds} rounds"):
        results = run_local(workdir or out / "deployment", clients, config, secure=secure, timeout=timeout,
                            node_data=node_data)
    console.print(_round_table(method, results["methods"][method]["rounds"]))
    console.print(_final_table(results))
    dep = results["deployment"]
    console.print(f"run {dep['run_id']} {dep['status']} in {dep['seconds']:.0f}s; Flower counted "
                  f"{dep['flower_network_bytes'].get('total-bytes', 0) / 1e6:.2f} MB on the network; "
                  f"wrote {out / 'results.json'}")


@app.command()
def certs(
    folder: Annotated[Path, typer.Argument(help="where to write ca.crt, server.pem/.key and node-<i>.key/.pub")],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to create")] = 3,
    host: Annotated[list[str] | None, typer.Option(help="extra SuperLink host name or IP for the certificate (repeatable)")] = None,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and SuperNode authentication keys for Flower."""
    from fedge.certs import create_credentials

    creds = create_credentials(folder, nodes=nodes, hosts=host or [])
    console.print(f"CA {creds.ca_cert}; SuperLink {creds.server_cert} + {creds.server_key}; "
                  f"{len(creds.node_keys)} SuperNode keys ({', '.join(p.name for p, _ in creds.node_keys)}) and .pub files")


@app.command("node-data")
def node_data_cmd(
    folder: Annotated[Path, typer.Argument(help="where to write node-<i>.npz")],
    clients: Annotated[int, typer.Option(help="partitions to write")] = 3,
    scenario: str = "digits-shift",
    seed: int = 0,
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew concentration")] = 0.5,
) -> None:
    """Write each scenario partition as a node-data file, for SuperNodes started with `data-path` in their node config."""
    from fedge.node_data import save_node_data
    from fedge.scenario import load_scenario

    chosen = load_scenario(scenario, seed=seed, alpha=alpha)
    for i in track(range(clients), description="partitions", console=console):
        data = chosen.client_data(i, clients)
        save_node_data(folder / f"node-{i}.npz", data)
    console.print(f"wrote {clients} node-data files to {folder}")


@bench_app.command("codecs")
def bench_codecs(
    codecs: Annotated[str, typer.Option(help="comma-separated codecs (default: all registered)")] = "",
    random_params: Annotated[int, typer.Option(help="size of the random update (0: skip it)")] = 10_000_000,
    lora: Annotated[bool, typer.Option(help="also a real LoRA update from the scenario")] = True,
    repeats: int = 5,
    threads: Annotated[int, typer.Option(help="numeric threads (1: one core; 0: no cap)")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
) -> None:
    """Each codec against dense fp32 and its entropy bound; encode/decode speed against memcpy of the same buffer."""
    from fedge.sim.bench_codecs import print_codec_bench, run_codec_bench

    names = [c.strip() for c in codecs.split(",") if c.strip()] or None
    rows = run_codec_bench(names, random_params=random_params, lora=lora, repeats=repeats, threads=threads or None)
    print_codec_bench(rows, console=console)
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2, default=str))


@bench_app.command("edge")
def bench_edge_cmd(
    scenario: str = "digits-shift",
    repeats: Annotated[int, typer.Option(help="timed runs per engine and batch size (median reported)")] = 50,
    threads: Annotated[int, typer.Option(help="intra-op threads for PyTorch and ONNX Runtime")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
) -> None:
    """PyTorch eager vs ONNX Runtime fp32/INT8 latency; full artifact vs weight-only push through the registry."""
    from fedge.sim.bench_edge import bench_edge, print_tables

    result = bench_edge(scenario, repeats=repeats, threads=threads)
    print_tables(result, console=console)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


@app.command("export")
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


registry_app = typer.Typer(help="The model registry that publishes signed artifacts to edge agents.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
edge_app = typer.Typer(help="Edge devices: the agent, and a local fleet deployment.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")


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


@app.command()
def methods() -> None:
    """List the federation methods."""
    for m in METHODS.values():
        console.print(f"[bold]{m.name}[/bold]: {m.summary}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
