"""`fedge run`, `fedge methods` and `fedge bench ...`: simulated federations and the benchmark suite."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.console import console, progress_bars
from fedge.errors import UserError
from fedge.settings import RunSettings

_DEFAULTS = RunSettings()

bench_app = typer.Typer(help="Benchmarks: ours against the baseline, measured side by side in one run.",
                        no_args_is_help=True)


def method_configs(names: list[str], common: dict[str, Any], items: list[str]) -> dict[str, dict[str, Any]]:
    """Each method's run config: `common` plus the `--run-config` overrides that apply to it.

    An override is a common key (every method), `METHOD.KEY` (that method), or a bare method key
    (`density-up=0.1`: every selected method that has it). Each result is checked by `resolve`.
    """
    from flwr.common.config import parse_config_args

    from fedge.methods import get_method, resolve

    configs = {name: dict(common, method=name) for name in names}
    try:
        overrides = parse_config_args(items)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--run-config") from err
    for key, value in overrides.items():
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
            raise UserError(f"{config['method']}: {err}", "fix the option or --run-config key named; "
                            "`fedge run --help` lists the options") from err
    return configs


def parse_seeds(seeds: str, seed: int) -> list[int]:
    """`--seeds 0,1,2` (each method runs on each), else the one `--seed`."""
    try:
        parsed = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds") from err
    if len(set(parsed)) != len(parsed):
        raise typer.BadParameter(f"{seeds!r} repeats a seed", param_hint="--seeds")
    return parsed or [seed]


def run(
    methods: Annotated[str, typer.Option(help="comma-separated; `fedge methods` lists them")] = "lora-fedavg,full-fedavg",
    rounds: Annotated[int | None, typer.Option(min=1, help="server rounds (default 10; --quick 5)")] = None,
    clients: Annotated[int | None, typer.Option(min=2, help="virtual clients (default 8; --quick 6)")] = None,
    clients_per_round: Annotated[int, typer.Option(min=0, help="clients sampled per round (0: all)")] = 0,
    seed: int = 0,
    seeds: Annotated[str, typer.Option(
        help="comma-separated seeds: every method runs on each, and figures are reported as mean and 95% interval "
             "(each seed's own results in OUT/seed-N); default: --seed alone")] = "",
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
    max_length: Annotated[int, typer.Option(min=2, help="tokens per sequence (text scenarios)")] = 128,
    lora_targets: Annotated[str, typer.Option(
        help="comma-separated modules LoRA goes into (default: the scenario's; peft's defaults for --model)")] = "",
    load_in_4bit: Annotated[bool, typer.Option(help="QLoRA: load the base in 4-bit NF4 (bitsandbytes, CUDA only)")] = False,
    local_epochs: Annotated[int | None, typer.Option(
        min=1, help="local epochs per round (default: the scenario's own, else 3; --quick 2)")] = None,
    lr: Annotated[float, typer.Option(help="local learning rate (0: each method's default)")] = 0.0,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank of every adapted layer")] = _DEFAULTS.lora_rank,
    lora_alpha: Annotated[int, typer.Option(min=1, help="LoRA alpha (updates are scaled by alpha / rank)")] = _DEFAULTS.lora_alpha,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, else fp32), fp32 or bf16")] = "auto",
    eval_clients: Annotated[int, typer.Option(
        min=0, help="clients evaluated after each round (0: all when at most 50, else 50); the last round evaluates all")] = 0,
    downlink_codec: Annotated[str, typer.Option(
        help="downloads: auto (the method's own codec where it has one), dense, or a codec name")] = "auto",
    out: Annotated[Path, typer.Option(help="output folder: results.json, the plot, checkpoints, the edge fleet's state; "
                                      "an earlier run's outputs there are replaced")] = Path("fedge-out"),
    quick: Annotated[bool, typer.Option(help="a small run (5 rounds, 6 clients, 2 local epochs or the scenario's own, unless given) "
                                        "that takes a few minutes on 2 CPU cores")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoints in OUT/checkpoints instead of starting over")] = False,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", help="Flower-style overrides, e.g. \"density-up=0.0625 flasc.server-opt='adamw'\" (repeatable)")] = None,
    edge_devices: Annotated[int | None, typer.Option(
        min=0, help="edge agents (separate processes on loopback) that receive the run's models: the base, then each "
                    "LoRA method's final adapter as an adapter update (without LoRA methods, or for a language model, "
                    "the first method's model); 0: none (default 2; 0 for text models, whose ONNX export takes longer: "
                    "ask for it)")] = None,
) -> None:
    """Run federations of the given methods on a scenario, with Flower's simulation runtime, then deploy to the edge."""
    from fedge.methods import available_methods
    from fedge.outputs import EDGE, check_out_dir, clear_previous_run
    from fedge.scenario import default_local_epochs
    from fedge.results import RESULTS_FILE, combine_seeds, final_table, method_results, plot_results, write_results
    from fedge.sim.resources import PeakMemory
    from fedge.training import resolve_device

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in available_methods()]
    if unknown or not names:
        raise typer.BadParameter(f"unknown methods {unknown}; known: {', '.join(available_methods())}",
                                 param_hint="--methods")
    if model and scenario not in (None, "hf"):
        raise typer.BadParameter(f"--model builds scenario hf; it does not go with --scenario {scenario}",
                                 param_hint="--scenario")
    scenario = scenario or ("hf" if model else "digits-shift")
    try:
        scenario_epochs = default_local_epochs(scenario)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--scenario") from err
    rounds = rounds or (5 if quick else 10)
    clients = clients or (6 if quick else 8)
    local_epochs = local_epochs or scenario_epochs or (2 if quick else 3)
    if clients_per_round > clients:
        raise typer.BadParameter(f"{clients_per_round} is more than --clients {clients}", param_hint="--clients-per-round")
    seed_list = parse_seeds(seeds, seed)
    out = check_out_dir(out)
    resolve_device(device)
    common = {"num-server-rounds": rounds, "num-clients": clients, "clients-per-round": clients_per_round,
              "alpha": alpha, "scenario": scenario, "model": model,
              "task": task, "data": data, "text-column": text_column, "label-column": label_column,
              "partition": partition, "max-length": max_length, "lora-targets": lora_targets,
              "load-in-4bit": load_in_4bit, "local-epochs": local_epochs, "lr": lr, "lora-rank": lora_rank,
              "lora-alpha": lora_alpha, "device": device, "precision": precision, "eval-clients": eval_clients,
              "downlink-codec": downlink_codec, "checkpoint": "auto" if resume else "fresh"}
    folders = {s: out / f"seed-{s}" if len(seed_list) > 1 else out for s in seed_list}
    configs = {s: method_configs(names, {**common, "seed": s, "out-dir": str(folders[s])}, run_config or [])
               for s in seed_list}  # every key of every seed checked before anything trains
    removed = clear_previous_run(out, keep_checkpoints=resume)
    if removed:
        console.print(f"{out} held an earlier run: replaced its {', '.join(removed)}"
                      + (" (checkpoints kept: --resume)" if resume else ""))
    started = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    first_arrays: dict[str, Any] = {}  # each method's final state in the first seed (what the edge receives)
    with PeakMemory() as memory, progress_bars() as progress:
        for s in seed_list:  # what a scenario builds once (a base to train or pretrain, data to split), with its bars
            edge_devices = prepare_scenario(configs[s], names, edge_devices)
        tasks = {name: progress.add_task(f"{name:>12}", total=rounds * len(seed_list), note="") for name in names}
        for s in seed_list:
            results: dict[str, Any] | None = None
            for name in names:
                outcome = simulate_method(configs[s][name], progress, tasks[name], memory,
                                          f"{name} (seed {s})" if len(seed_list) > 1 else name)
                if s == seed_list[0]:
                    first_arrays[name] = outcome.arrays
                results = method_results(scenario=outcome.scenario, base_accuracy=outcome.base.accuracy,
                                         base_metrics=outcome.base_metrics, name=name, entry=outcome.entry,
                                         into=results)
                write_results(folders[s], results)  # a finished method is kept even if a later one fails
            assert results is not None
            per_seed[s] = results
        results = combine_seeds(per_seed) if len(seed_list) > 1 else per_seed[seed_list[0]]
        if edge_devices:
            results["edge"] = deploy_final(configs[seed_list[0]], first_arrays, edge_devices, out / EDGE)
    results["run"] = {"methods": names, "rounds": rounds, "clients": clients, "seeds": seed_list,
                      "seconds": time.perf_counter() - started, "peak_memory_bytes": memory.peak.pss_bytes,
                      "peak_rss_bytes": memory.peak.rss_bytes}
    if len(seed_list) > 1:
        results["run"]["seed_results"] = {str(s): str(folders[s] / RESULTS_FILE) for s in seed_list}
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
    console.print(f"peak memory of the whole process tree (Ray workers included): "
                  f"{memory.peak.pss_bytes / 2**30:.2f} GiB PSS ({memory.peak.rss_bytes / 2**30:.2f} GiB RSS summed)")
    console.print(f"wrote {out / RESULTS_FILE} and {plot}")


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
        if edge_devices and text_model and scenario.task != "causal-lm":
            raise ValueError(f"edge agents serve classifiers of feature tensors and causal language models, not "
                             f"{scenario.task} of text; run with --edge-devices 0")
        if edge_devices and settings.load_in_4bit:
            raise ValueError("a 4-bit base does not export to ONNX; run with --edge-devices 0")
        scenario.base_model()  # a scenario that pretrains its base does it here, with its own progress bar
        for p in range(settings.num_clients):
            scenario.client_data(p, settings.num_clients)
    except (ValueError, RuntimeError) as err:
        raise typer.BadParameter(str(err)) from err
    return (0 if text_model else 2) if edge_devices is None else edge_devices


def simulate_method(config: dict[str, Any], progress: Any, task: Any, memory: Any, title: str) -> Any:
    """One federation (its results kept in process: `fedge run` writes one results.json for all it ran); its
    per-round lines and table, and its wall time and peak memory per round added to its entry."""
    from fedge.results import round_line, round_table
    from fedge.sim.runner import simulate

    rows: list[dict[str, Any]] = []
    laps: list[int] = []
    memory.lap()
    progress.update(task, description=f"{title:>12}")

    def on_round(_: str, row: dict[str, Any]) -> None:
        rows.append(row)
        laps.append(memory.lap().pss_bytes)
        quality = f"ppl {row['perplexity']:.2f}" if "perplexity" in row else f"acc {row['accuracy']:.3f}"
        progress.update(task, advance=1, note=f"{quality}  up {row['uplink_bytes'] / 1e3:.0f} KB")
        progress.console.print(round_line(title, row))

    outcome = simulate(config, on_round=on_round, record=False)
    seconds = [r["round_seconds"] for r in rows]
    outcome.entry["resources"] = {
        "round_peak_memory_bytes": laps,
        "peak_memory_bytes": max(laps, default=0),
        "median_round_seconds": statistics.median(seconds) if seconds else None,
    }
    progress.console.print(round_table(title, rows))
    if seconds:
        progress.console.print(f"{title}: median round {statistics.median(seconds):.1f} s, peak memory "
                               f"{max(laps) / 2**30:.2f} GiB (whole process tree, PSS)")
    return outcome


def deploy_final(configs: dict[str, dict[str, Any]], arrays: dict[str, Any], devices: int,
                 workdir: Path) -> dict[str, Any]:
    """Push the run's models to `devices` edge agents; returns results.json's "edge" entry.

    With LoRA methods in the run, v1 is the base with the adapter every method started from (a whole model: what
    the fleet serves before any federation), then each LoRA method's final adapter, in run order, is the next
    version, sent as an adapter update; a method without an adapter (full-fedavg, pfedgate) is not pushed, since
    a whole model of its own would replace the base the updates apply to. Without LoRA methods, the first
    method's final model is the one version.
    """
    from fedge.adapters import adapter_state
    from fedge.edge.fleet import deploy_adapter_updates, deploy_to_edge
    from fedge.methods import get_method
    from fedge.scenario import scenario_for
    from fedge.settings import RunSettings
    from fedge.sim.handoff import adapted_model, final_model, fleet_data
    from fedge.state import from_record

    names = list(configs)
    task = scenario_for(RunSettings.from_config(configs[names[0]])).task
    lora = [name for name in names if get_method(name).payload != "full"]
    if not lora or task != "classification":
        edge = deploy_to_edge(final_model(configs[names[0]], from_record(arrays[names[0]])), fleet_data(configs[names[0]]),
                              devices, workdir, task=task)
        why = "only the first method's model is pushed " + ("without adapters" if not lora else
                                                              "(adapter updates are for classifiers)")
        edge["not_pushed"] = {name: why for name in names[1:]}
        _print_edge(edge, names[0])
        return edge
    start = adapted_model(configs[lora[0]])
    shapes = {k: v.shape for k, v in adapter_state(start).items()}
    adapters, not_pushed = [], {name: "no adapter (its whole model would replace the base)" for name in names
                                if name not in lora}
    for name in lora:
        adapter = adapter_state(adapted_model(configs[name], from_record(arrays[name])))
        if {k: v.shape for k, v in adapter.items()} == shapes:
            adapters.append((name, adapter))
        else:
            not_pushed[name] = "its adapter's tensors differ from the base's (another rank or targets)"
    edge = deploy_adapter_updates(start, adapters, fleet_data(configs[lora[0]]), devices, workdir)
    edge["not_pushed"] = not_pushed
    for version in edge["versions"]:
        update = version.get("adapter_update")
        fetched = ", ".join(f"{d} {v['format']} {v['bytes_fetched'] / 1e3:.1f} KB" + (
            f" ({v['adapter_mode']}" + (f": unmerged costs {v['unmerged_cost']:.2f}x merged there" if v["unmerged_cost"]
                                        else "") + ")" if v["adapter_mode"] else "") for d, v in version["devices"].items())
        head = (f"adapter update {update['bytes'] / 1e3:.1f} KB ({update['of_fp32']:.1%} of fp32's "
                f"{version['bytes']['fp32'] / 1e6:.2f} MB; dense {update['dense_bytes'] / 1e3:.0f} KB)"
                if update else "whole model")
        console.print(f"edge v{version['version']} {version['model']}: {head}; accuracy {version['accuracy']:.4f}; "
                      f"unmerged vs merged {version['unmerged_max_abs_diff_vs_merged']:.1e}; devices fetched: {fetched}")
    for name, reason in not_pushed.items():
        console.print(f"edge: {name} not pushed: {reason}")
    _print_edge(edge, adapters[-1][0] if adapters else "base")
    return edge


def _print_edge(edge: dict[str, Any], model: str) -> None:
    """What the fleet serves at the end: the last version's formats and the devices' own figures."""
    from fedge.edge.capabilities import describe

    fp32, int8 = edge["fp32"], edge["int8"]
    served = ", ".join(f"{n} {fmt}" for fmt, n in sorted(edge["formats_served"].items()))
    if "perplexity" in fp32:  # a causal LM: its devices report next-token accuracy
        quality = (f"fp32 {fp32['bytes'] / 1e6:.2f} MB at perplexity {fp32['perplexity']:.2f} (max |onnx - torch| "
                   f"{edge['artifact']['max_abs_diff_vs_torch']:.1e}), int8 {int8['bytes'] / 1e6:.2f} MB at perplexity "
                   f"{int8['perplexity']:.2f}, measured on {describe(edge['host'])}; fleet next-token accuracy")
    else:
        quality = (f"fp32 {fp32['bytes'] / 1e6:.2f} MB at accuracy {fp32['accuracy']:.4f} (max |onnx - torch| "
                   f"{edge['artifact']['max_abs_diff_vs_torch']:.1e}), int8 {int8['bytes'] / 1e6:.2f} MB at accuracy "
                   f"{int8['accuracy']:.4f} (top-1 agreement with fp32 {int8['agreement_vs_fp32']:.4f}), measured on "
                   f"{describe(edge['host'])}; fleet accuracy")
    console.print(f"edge: {edge['deployed']}/{edge['devices']} agents serve {model} ({served}) on "
                  f"{edge['runtime']}; {quality} {edge['accuracy']:.4f}, p50 {edge['p50_latency_ms']:.2f} ms")


def run_source(out: Path | None, method: str | None, checkpoint: Path | None) -> Any:
    """A finished run's final model for `fedge export --from` and `fedge edge deploy --from` (the edge's CLI
    gets this from the top-level CLI: rebuilding a method's model needs the methods, which the edge never imports)."""
    from fedge.sim.handoff import run_source as load

    return load(out, method, checkpoint)


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


@bench_app.command("aggregate")
def bench_aggregate(
    clients: Annotated[int, typer.Option(help="envelopes aggregated per round")] = 1000,
    params: Annotated[int, typer.Option(help="parameters of each update")] = 1_000_000,
    codecs: Annotated[str, typer.Option(help="comma-separated codecs of fedge's path")] = "dense,fedzip,flasc,q8",
    compare_clients: Annotated[int, typer.Option(
        help="a second, smaller client count, to show how time and memory grow (0: none)")] = 100,
    rounds: Annotated[int, typer.Option(help="timed rounds per path (median reported)")] = 3,
    distinct: Annotated[int, typer.Option(help="distinct updates the clients' envelopes cycle through")] = 8,
    flower: Annotated[bool, typer.Option(help="also Flower's stock FedAvg on the same updates as dense ArrayRecords")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
) -> None:
    """The server's decode-and-aggregate path per round on one core, with peak memory, against Flower's FedAvg."""
    from fedge.sim.bench_aggregate import FLOWER, print_aggregate_bench, run_aggregate_bench, with_ratios

    paths = [c.strip() for c in codecs.split(",") if c.strip()] + ([FLOWER] if flower else [])
    counts = sorted({c for c in (compare_clients, clients) if c > 0})
    with console.status("aggregating (each path in its own process, one core)") as status:
        rows = run_aggregate_bench(paths, counts, params, rounds=rounds, distinct=distinct, on_result=lambda r:
                                   status.update(f"done: {r['path']} x {r['clients']} clients ({r['seconds']:.2f} s)"))
    print_aggregate_bench(with_ratios(rows), console=console)
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))


@bench_app.command("edge")
def bench_edge(
    scenario: str = "digits-shift",
    repeats: Annotated[int, typer.Option(help="timed runs per engine and batch size (median reported)")] = 50,
    threads: Annotated[int, typer.Option(help="intra-op threads for PyTorch and ONNX Runtime")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
) -> None:
    """PyTorch eager vs ONNX Runtime fp32/INT8 latency; full artifact vs weight-only push through the registry;
    a new version as an adapter update (bytes, apply time, unmerged vs merged latency)."""
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
    with progress_bars() as progress:
        task = progress.add_task("fleet bench", total=len(chosen) * repeats, note="")
        started = []

        def step(what: str) -> None:
            if started:
                progress.advance(task)
            started.append(what)
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
