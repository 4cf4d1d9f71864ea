"""`fedge run`, `fedge methods` and `fedge bench ...`: simulated federations and the benchmark suite."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedge.console import console

bench_app = typer.Typer(help="Benchmarks: ours against the baseline, measured side by side in one run.",
                        no_args_is_help=True)


def method_configs(names: list[str], common: dict[str, Any], items: list[str]) -> dict[str, dict[str, Any]]:
    """Each method's run config: `common` plus the `--run-config` overrides that apply to it.

    An override is a common key (every method), `METHOD.KEY` (that method), or a bare method key
    (`density-up=0.1`: every selected method that has it). Each result is checked by `resolve`.
    """
    from flwr.common.config import parse_config_args

    from fedge.methods import get_method, resolve
    from fedge.settings import RunSettings

    configs = {name: dict(common, method=name) for name in names}
    for key, value in parse_config_args(items).items():
        section, dot, rest = key.partition(".")
        if key in RunSettings.config_keys():
            targets = {name: key for name in names}
        elif dot:
            if section not in names:
                raise typer.BadParameter(f"{key}: {section!r} is not one of the methods run ({', '.join(names)})",
                                         param_hint="--run-config")
            targets = {section: rest}
        else:
            targets = {name: key for name in names if key in get_method(name).options.config_keys()}
            if not targets:
                valid = sorted({*RunSettings.config_keys(), *(k for n in names for k in get_method(n).options.config_keys())})
                raise typer.BadParameter(f"no method run uses {key!r}; valid keys: {', '.join(valid)}",
                                         param_hint="--run-config")
        for name, own in targets.items():
            configs[name][own if own in RunSettings.config_keys() else f"{name}.{own}"] = value
    for config in configs.values():
        try:
            resolve(config)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--run-config") from err
    return configs


def run(
    methods: Annotated[str, typer.Option(help="comma-separated; `fedge methods` lists them")] = "lora-fedavg,full-fedavg",
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
        "--run-config", help="Flower-style overrides, e.g. \"density-up=0.0625 flasc.server-opt='adamw'\" (repeatable)")] = None,
    edge_devices: Annotated[int, typer.Option(
        help="edge agents (separate processes on loopback) that receive the first method's final model; 0: none")] = 2,
) -> None:
    """Run federations of the given methods on a scenario, with Flower's simulation runtime, then deploy to the edge."""
    from fedge.methods import available_methods
    from fedge.results import (
        PLOT_FILE,
        RESULTS_FILE,
        final_table,
        load_results,
        plot_accuracy_vs_uplink,
        round_table,
        write_results,
    )
    from fedge.sim.runner import simulate

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in available_methods()]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; known: {', '.join(available_methods())}",
                                 param_hint="--methods")
    clients = clients or (6 if quick else 8)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    if results_path.exists():
        results_path.unlink()  # a run's results.json describes that run only
    common = {"num-server-rounds": rounds, "num-clients": clients, "clients-per-round": clients_per_round,
              "seed": seed, "alpha": alpha, "scenario": scenario, "local-epochs": local_epochs, "lr": lr,
              "device": device, "out-dir": str(out), "checkpoint": "auto" if resume else "fresh"}
    configs = method_configs(names, common, run_config or [])
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

            outcomes[name] = simulate(configs[name], on_round=on_round)
            progress.console.print(round_table(name, rows))
    results = load_results(out)
    if edge_devices > 0:
        results["edge"] = deploy_final(configs[names[0]], outcomes[names[0]].arrays, edge_devices, out)
    results["run"] = {"methods": names, "rounds": rounds, "clients": clients, "seconds": time.perf_counter() - started}
    write_results(out, results)
    plot = plot_accuracy_vs_uplink(results, out / PLOT_FILE)
    console.print(final_table(results))
    for name, entry in results.get("methods", {}).items():
        share = entry.get("uplink", {}).get("budget_weighted_dense_bytes")
        if share:  # sparsity budgets: what the method sent against what its budgets allow of a dense upload
            sent = entry["uplink"]["bytes"]
            console.print(f"{name}: uplink {sent / 1e6:.1f} MB = {sent / share:.3f} of its budget-weighted dense share "
                          f"({share / 1e6:.1f} MB)")
    console.print(f"wrote {results_path} and {plot}")


def deploy_final(config: dict[str, Any], arrays: Any, devices: int, out: Path) -> dict[str, Any]:
    """Export the run's final model and push it to `devices` edge agents; returns results.json's "edge" entry."""
    from fedge.edge.fleet import deploy_to_edge
    from fedge.sim.handoff import final_model, fleet_data

    with console.status(f"{config['method']}: exporting and deploying to {devices} edge agents"):
        edge = deploy_to_edge(final_model(config, arrays), fleet_data(config), devices, out / "edge")
    art = edge["artifact"]
    console.print(f"edge: {edge['deployed']}/{edge['devices']} agents serve {config['method']} on {edge['runtime']}; "
                  f"ONNX {art['bytes'] / 1e6:.2f} MB (max |onnx - torch| {art['max_abs_diff_vs_torch']:.1e}), "
                  f"int8 {edge['int8']['bytes'] / 1e6:.2f} MB at accuracy {edge['int8']['accuracy']:.4f}; "
                  f"fleet accuracy {edge['accuracy']:.4f}, p50 {edge['p50_latency_ms']:.2f} ms")
    return edge


def methods() -> None:
    """List the federation methods."""
    from fedge.methods import available_methods, get_method

    for name in available_methods():
        console.print(f"[bold]{name}[/bold]: {get_method(name).summary}")


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
def bench_edge(
    scenario: str = "digits-shift",
    repeats: Annotated[int, typer.Option(help="timed runs per engine and batch size (median reported)")] = 50,
    threads: Annotated[int, typer.Option(help="intra-op threads for PyTorch and ONNX Runtime")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
) -> None:
    """PyTorch eager vs ONNX Runtime fp32/INT8 latency; full artifact vs weight-only push through the registry."""
    from fedge.sim.bench_edge import bench_edge as run_bench
    from fedge.sim.bench_edge import print_tables

    result = run_bench(scenario, repeats=repeats, threads=threads)
    print_tables(result, console=console)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


@bench_app.command("fleet")
def bench_fleet(
    method: str = "fedzip",
    clients: Annotated[int, typer.Option(help="simulated clients = SuperNodes")] = 3,
    rounds: int = 3,
    local_epochs: int = 1,
    repeats: Annotated[int, typer.Option(help="runs per mode, alternating between modes")] = 1,
    modes: Annotated[str, typer.Option(help="simulation plus deployed modes: process (a long-lived ClientApp per "
                                             "SuperNode), subprocess (Flower's process per message)")] = "simulation,process",
    workdir: Annotated[Path | None, typer.Option(help="where runs keep their outputs and logs (default: a temporary folder)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result here")] = None,
) -> None:
    """A deployed round (SuperLink + SuperNodes on loopback) against a simulated round of the same configuration."""
    from fedge.methods import available_methods
    from fedge.sim.bench_fleet import MODES, print_fleet_bench
    from fedge.sim.bench_fleet import bench_fleet as run_bench

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if method not in available_methods():
        raise typer.BadParameter(f"unknown method {method!r}", param_hint="--method")
    if "simulation" not in chosen or any(m not in MODES for m in chosen):
        raise typer.BadParameter(f"give simulation and any of {', '.join(MODES[1:])}", param_hint="--modes")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("fleet bench", total=len(chosen) * repeats)

        def step(what: str) -> None:
            if progress.tasks[0].description != "fleet bench":
                progress.advance(task)
            progress.update(task, description=what)

        result = run_bench(method, clients, rounds, local_epochs, repeats, chosen, workdir, on_step=step)
        progress.update(task, completed=len(chosen) * repeats, description="fleet bench done")
    print_fleet_bench(result, console=console)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(methods)
    app.add_typer(bench_app, name="bench")
