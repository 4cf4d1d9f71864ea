"""`fedge deploy-local` and `fedge certs`: Flower's deployment runtime on this machine, and its credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console


def deploy_local(
    method: Annotated[str, typer.Option(help="a method (`fedge methods` lists them)")] = "lora-fedavg",
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
    isolation: Annotated[str, typer.Option(help="process: a long-lived ClientApp process per SuperNode (`fedge clientapp`); "
                                                "subprocess: Flower's stock fresh process per message")] = "process",
) -> None:
    """Run one federation on Flower's deployment runtime: a SuperLink and N SuperNodes on loopback, via `flwr run`."""
    from fedge.methods import available_methods
    from fedge.results import final_table, round_table
    from fedge.server.local_deployment import ISOLATION_MODES, run_local

    if method not in available_methods():
        raise typer.BadParameter(f"unknown method {method!r}; known: {', '.join(available_methods())}",
                                 param_hint="--method")
    if isolation not in ISOLATION_MODES:
        raise typer.BadParameter(f"{isolation!r} is not one of {', '.join(ISOLATION_MODES)}", param_hint="--isolation")
    out = out.resolve()
    config = {"method": method, "num-server-rounds": rounds, "local-epochs": local_epochs, "out-dir": str(out),
              "round-timeout": round_timeout, "min-replies": min_replies, "checkpoint": checkpoint}
    with console.status(f"{method}: SuperLink + {clients} SuperNodes ({isolation} isolation), {rounds} rounds"):
        results = run_local(workdir or out / "deployment", clients, config, secure=secure, timeout=timeout,
                            node_data=node_data, isolation=isolation)
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
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to create")] = 3,
    host: Annotated[list[str] | None, typer.Option(help="extra SuperLink host name or IP for the certificate (repeatable)")] = None,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and SuperNode authentication keys for Flower."""
    from fedge.server.certs import create_credentials

    creds = create_credentials(folder, nodes=nodes, hosts=host or [])
    console.print(f"CA {creds.ca_cert}; SuperLink {creds.server_cert} + {creds.server_key}; "
                  f"{len(creds.node_keys)} SuperNode keys ({', '.join(p.name for p, _ in creds.node_keys)}) and .pub files")


def register(app: typer.Typer) -> None:
    app.command("deploy-local")(deploy_local)
    app.command()(certs)
