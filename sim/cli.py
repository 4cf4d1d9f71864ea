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
    scenario: Annotated[str | None, typer.Option(
        help="digits-shift (default), stdlib-code (a causal LM on Python's standard library), or hf "
             "(implied by --model)")] = None,
    model: Annotated[str, typer.Option(help="your Hugging Face model: a local directory, or a hub id where the hub "
                                            "is reachable (scenario hf)")] = "",
    task: Annotated[str, typer.Option(help="with --model: causal-lm or classification")] = "",
    data: Annotated[str, typer.Option(help="with --model: a json/jsonl/csv/parquet/txt file or a folder of them")] = "",
    text_column: Annotated[str, typer.Option(help="the data's text column")] = "text",
    label_column: Annotated[str, typer.Option(help="the data's label column (classification, dirichlet)")] = "label",
    partition: Annotated[str, typer.Option(
        help="how --data is split among clients (flwr-datasets): iid, dirichlet[:ALPHA] (over --label-column), "
             "natural:COLUMN")] = "iid",
    max_length: Annotated[int, typer.Option(help="tokens per sequence (text scenarios)")] = 128,
    lora_targets: Annotated[str, typer.Option(
        help="comma-separated modules LoRA goes into (default: the scenario's; peft's defaults for --model)")] = "",
    load_in_4bit: Annotated[bool, typer.Option(help="QLoRA: load the base in 4-bit NF4 (bitsandbytes, CUDA only)")] = False,
    local_epochs: int = 3,
    lr: Annotated[float, typer.Option(help="local learning rate (0: each method's default)")] = 0.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, else fp32), fp32 or bf16")] = "auto",
    out: Annotated[Path, typer.Option(help="output folder for results.json and the plot")] = Path("fedge-out"),
    quick: Annotated[bool, typer.Option(help="a small run that finishes in minutes on 2 CPU cores")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoints in OUT/checkpoints instead of starting over")] = False,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", help="Flower-style overrides, e.g. \"density-up=0.0625 flasc.server-opt='adamw'\" (repeatable)")] = None,
    edge_devices: Annotated[int | None, typer.Option(
        help="edge agents (separate processes on loopback) that receive the first method's final model; 0: none "
             "(default 2; 0 for text models, whose deployment to agents is not available yet)")] = None,
) -> None:
    """Run federations of the given methods on a scenario, with Flower's simulation runtime, then deploy to the edge."""
    from fedge.methods import available_methods
    from fedge.results import (
        RESULTS_FILE,
        final_table,
        load_results,
        plot_results,
        round_line,
        round_table,
        write_results,
    )
    from fedge.sim.runner import simulate

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in available_methods()]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; known: {', '.join(available_methods())}",
                                 param_hint="--methods")
    if model and scenario not in (None, "hf"):
        raise typer.BadParameter(f"--model builds scenario hf; it does not go with --scenario {scenario}",
                                 param_hint="--scenario")
    clients = clients or (6 if quick else 8)
    common = {"num-server-rounds": rounds, "num-clients": clients, "clients-per-round": clients_per_round,
              "seed": seed, "alpha": alpha, "scenario": scenario or ("hf" if model else "digits-shift"),
              "model": model, "task": task, "data": data, "text-column": text_column, "label-column": label_column,
              "partition": partition, "max-length": max_length, "lora-targets": lora_targets,
              "load-in-4bit": load_in_4bit, "local-epochs": local_epochs, "lr": lr, "device": device,
              "precision": precision, "out-dir": str(out), "checkpoint": "auto" if resume else "fresh"}
    configs = method_configs(names, common, run_config or [])
    edge_devices = prepare_scenario(configs, names, edge_devices)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    if results_path.exists():
        results_path.unlink()  # a run's results.json describes that run only
    started = time.perf_counter()
    outcomes: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), console=console) as progress:
        for name in names:
            task_bar = progress.add_task(f"{name:>12}", total=rounds, acc="")
            rows: list[dict[str, Any]] = []

            def on_round(_: str, row: dict[str, Any], task_bar: Any = task_bar, rows: list = rows,
                         name: str = name) -> None:
                rows.append(row)
                quality = f"ppl {row['perplexity']:.2f}" if "perplexity" in row else f"acc {row['accuracy']:.3f}"
                progress.update(task_bar, advance=1, acc=f"{quality}  up {row['uplink_bytes'] / 1e3:.0f} KB")
                progress.console.print(round_line(name, row))

            outcomes[name] = simulate(configs[name], on_round=on_round)
            progress.console.print(round_table(name, rows))
    results = load_results(out)
    if edge_devices > 0:
        results["edge"] = deploy_final(configs[names[0]], outcomes[names[0]].arrays, edge_devices, out)
    results["run"] = {"methods": names, "rounds": rounds, "clients": clients, "seconds": time.perf_counter() - started}
    write_results(out, results)
    plot = plot_results(results, out)
    console.print(final_table(results))
    for name, entry in results.get("methods", {}).items():
        share = entry.get("uplink", {}).get("budget_weighted_dense_bytes")
        if share:  # sparsity budgets: what the method sent against what its budgets allow of a dense upload
            sent = entry["uplink"]["bytes"]
            console.print(f"{name}: uplink {sent / 1e6:.1f} MB = {sent / share:.3f} of its budget-weighted dense share "
                          f"({share / 1e6:.1f} MB)")
        if "adapter" in entry:
            console.print(f"{name}: adapter in {entry['adapter']['dir']} (peft; base: {entry['adapter']['base_model']})")
    console.print(f"wrote {results_path} and {plot}")


def prepare_scenario(configs: dict[str, dict[str, Any]], names: list[str], edge_devices: int | None) -> int:
    """Check the run against its scenario before anything trains, build what the scenario builds once (a base to
    pretrain, data to read and split), and settle how many edge agents get the model."""
    from fedge.methods import get_method
    from fedge.pretrained import check_4bit
    from fedge.scenario import scenario_for
    from fedge.settings import RunSettings
    from fedge.training import resolve_device

    settings = RunSettings.from_config(configs[names[0]])
    text_model = False
    try:
        if settings.load_in_4bit:
            check_4bit(resolve_device(settings.device))
        scenario = scenario_for(settings)
        for name in names:
            get_method(name).check_scenario(scenario)
        text_model = scenario.task != "classification" or callable(getattr(scenario, "tokenizer", None))
        if text_model and edge_devices:
            raise ValueError(f"deploying a {scenario.task} text model to edge agents is not available yet (the agents "
                             "serve classifiers of feature tensors); run with --edge-devices 0")
        scenario.base_model()  # a scenario that pretrains its base does it here, with its own progress bar
        for p in range(settings.num_clients):
            scenario.client_data(p, settings.num_clients)
    except (ValueError, RuntimeError) as err:
        raise typer.BadParameter(str(err)) from err
    return (0 if text_model else 2) if edge_devices is None else edge_devices


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


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(methods)
    app.add_typer(bench_app, name="bench")
