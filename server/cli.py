"""`fedge deploy-local` and `fedge certs`: Flower's deployment runtime on this machine, and its credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console, progress_bars
from fedge.errors import UserError


def deploy_local(
    method: Annotated[str, typer.Option(help="a method (`fedge methods` lists them)")] = "lora-fedavg",
    rounds: Annotated[int, typer.Option(min=1, help="server rounds")] = 3,
    clients: Annotated[int, typer.Option(min=2, help="SuperNodes to start (one partition each)")] = 3,
    local_epochs: Annotated[int, typer.Option(min=1)] = 1,
    out: Annotated[Path, typer.Option(
        help="output folder: results.json, checkpoints (OUT/checkpoints), the deployment's processes (OUT/deployment); "
             "an earlier run's outputs there are replaced")] = Path("fedge-out/deploy-local"),
    secure: Annotated[bool, typer.Option(help="TLS on every API and SuperNode authentication (fresh certificates)")] = False,
    round_timeout: Annotated[float, typer.Option(min=1, help="seconds a round waits for replies")] = 300.0,
    min_replies: Annotated[float, typer.Option(help="replies a round needs: below 1 a fraction, else a count")] = 0.5,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoints (same config) instead of starting over")] = False,
    workdir: Annotated[Path | None, typer.Option(help="logs, Flower state and certificates (default OUT/deployment)")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="give up on the run after this many seconds")] = 3600.0,
    node_data: Annotated[Path | None, typer.Option(
        help="folder of node-<i>.npz (`fedge node-data`): each node trains on its own file", exists=True, file_okay=False)] = None,
    isolation: Annotated[str, typer.Option(help="process: a long-lived ClientApp process per SuperNode (`fedge clientapp`); "
                                                "subprocess: Flower's stock fresh process per message")] = "process",
) -> None:
    """Run one federation on Flower's deployment runtime: a SuperLink and N SuperNodes on loopback, via `flwr run`."""
    from fedge.methods import available_methods, resolve
    from fedge.outputs import DEPLOYMENT, check_out_dir, clear_previous_run
    from fedge.results import final_table, round_table
    from fedge.server.local_deployment import ISOLATION_MODES, run_local

    if method not in available_methods():
        raise typer.BadParameter(f"unknown method {method!r}; known: {', '.join(available_methods())}",
                                 param_hint="--method")
    if isolation not in ISOLATION_MODES:
        raise typer.BadParameter(f"{isolation!r} is not one of {', '.join(ISOLATION_MODES)}", param_hint="--isolation")
    out = check_out_dir(out)
    workdir = check_out_dir(workdir, "--workdir") if workdir is not None else out / DEPLOYMENT
    if node_data is not None:
        missing = [f"node-{i}.npz" for i in range(clients) if not (node_data / f"node-{i}.npz").is_file()]
        if missing:
            raise UserError(f"--node-data {node_data} lacks {', '.join(missing)}",
                            f"write them with `fedge node-data {node_data} --clients {clients}`")
    config = {"method": method, "num-server-rounds": rounds, "num-clients": clients, "local-epochs": local_epochs,
              "out-dir": str(out), "round-timeout": round_timeout, "min-replies": min_replies,
              "checkpoint": "auto" if resume else "fresh"}
    try:
        resolve(config)  # every key and value checked before any process starts
    except ValueError as err:
        raise UserError(str(err), "fix the option named; `fedge deploy-local --help` lists them") from err
    removed = clear_previous_run(out, keep_checkpoints=resume)
    if removed:
        console.print(f"{out} held an earlier run: replaced its {', '.join(removed)}")
    with progress_bars():
        results = run_local(workdir, clients, config, secure=secure, timeout=timeout, node_data=node_data,
                            isolation=isolation)
    console.print(round_table(method, results["methods"][method]["rounds"]))
    console.print(final_table(results))
    dep = results["deployment"]
    overhead = dep["per_message_overhead_s"]
    console.print(f"run {dep['run_id']} {dep['status']} in {dep['seconds']:.0f}s; Flower counted "
                  f"{dep['flower_network_bytes'].get('total-bytes', 0) / 1e6:.2f} MB on the network; "
                  f"per-message overhead median {overhead.get('median', 0):.2f}s, max {overhead.get('max', 0):.2f}s "
                  f"over {overhead.get('count', 0)} messages; wrote {out / 'results.json'}")


def certs(
    folder: Annotated[Path, typer.Argument(help="where to write ca.crt, server.pem/.key and node-<i>.key/.pub")],
    nodes: Annotated[int, typer.Option(min=1, help="SuperNode key pairs to create")] = 3,
    host: Annotated[list[str] | None, typer.Option(help="extra SuperLink host name or IP for the certificate (repeatable)")] = None,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and SuperNode authentication keys for Flower."""
    from fedge.outputs import check_out_dir
    from fedge.server.certs import create_credentials

    creds = create_credentials(check_out_dir(folder, "FOLDER"), nodes=nodes, hosts=host or [])
    console.print(f"CA {creds.ca_cert}; SuperLink {creds.server_cert} + {creds.server_key}; "
                  f"{len(creds.node_keys)} SuperNode keys ({', '.join(p.name for p, _ in creds.node_keys)}) and .pub files")


def register(app: typer.Typer) -> None:
    app.command("deploy-local")(deploy_local)
    app.command()(certs)
