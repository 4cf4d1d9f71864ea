"""`fedge node-data`: a scenario's partitions as node-data files, to try SuperNodes that read their own data;
`fedge clientapp`: a SuperNode's long-lived ClientApp process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import track

from fedge.console import console


def node_data(
    folder: Annotated[Path, typer.Argument(help="where to write node-<i>.npz")],
    clients: Annotated[int, typer.Option(min=1, help="partitions to write")] = 3,
    scenario: str = "digits-shift",
    seed: int = 0,
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew concentration")] = 0.5,
) -> None:
    """Write each scenario partition as a node-data file, for SuperNodes started with `data-path` in their node config."""
    from fedge.client.node_data import save_node_data
    from fedge.outputs import check_out_dir
    from fedge.scenario import scenario_for
    from fedge.settings import RunSettings

    folder = check_out_dir(folder, "FOLDER")
    try:
        chosen = scenario_for(RunSettings(scenario=scenario, seed=seed, alpha=alpha))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--scenario") from err
    if chosen.task != "classification":
        raise typer.BadParameter(f"node-data files hold labelled samples for a classifier; {scenario} is {chosen.task}",
                                 param_hint="--scenario")
    for i in track(range(clients), description="partitions", console=console):
        save_node_data(folder / f"node-{i}.npz", chosen.client_data(i, clients))
    console.print(f"wrote {clients} node-data files to {folder}")


def clientapp(
    runtime_api_address: Annotated[str, typer.Option(help="the SuperNode's Runtime API, HOST:PORT (its --port)")],
    insecure: Annotated[bool, typer.Option(help="reach the Runtime API without TLS")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the Runtime API (SuperNode --ssl-certfile)")] = None,
    superexec_auth_secret_file: Annotated[Path | None, typer.Option(help="the secret file the SuperNode was given")] = None,
    parent_pid: Annotated[int | None, typer.Option(help="stop when this process (the SuperNode) ends")] = None,
    poll: Annotated[float, typer.Option(help="seconds between task polls while a federation is active")] = 0.1,
    idle_poll: Annotated[float, typer.Option(help="seconds between task polls after --busy-window idle seconds")] = 1.0,
    busy_window: Annotated[float, typer.Option(help="seconds after a task during which polls are --poll apart")] = 120.0,
    preload: Annotated[list[str] | None, typer.Option(help="more modules to import before the first task, besides "
                                                      "torch, numpy and Flower's (repeatable; e.g. peft)")] = None,
) -> None:
    """Serve a SuperNode's messages in one long-lived ClientApp process (SuperNode started with --isolation process).

    Flower starts a fresh ClientApp process per message; this one stays, so a message costs its work, not a
    Python start-up. It restarts itself for a new app bundle and is restarted if it dies.
    """
    from fedge.client.worker import RuntimeAccess, supervise

    if not insecure and root_certificates is None:
        raise typer.BadParameter("give --insecure or --root-certificates", param_hint="--insecure")
    access = RuntimeAccess(runtime_api_address, insecure, str(root_certificates) if root_certificates else None,
                           str(superexec_auth_secret_file) if superexec_auth_secret_file else None)
    serve_args = [*access.args(), "--poll", str(poll), "--idle-poll", str(idle_poll), "--busy-window", str(busy_window)]
    for module in preload or []:
        serve_args += ["--preload", module]
    raise typer.Exit(supervise(serve_args, parent_pid, on_event=lambda line: console.print(f"fedge clientapp: {line}")))


def supernode(
    ctx: typer.Context,
    min_pause: Annotated[float, typer.Option(help="seconds before asking the SuperLink again after a message; "
                                                  "doubles with each empty ask up to Flower's 3 s")] = 0.1,
    reply_pause: Annotated[float, typer.Option(help="seconds between checks for the ClientApp's reply (Flower: 0.5)")] = 0.05,
) -> None:
    """Flower's flower-supernode (every other argument is its own) with shorter pauses between its polls.

    Flower 1.39's SuperNode waits 3 s after each empty ask for a message, so each wave of a round reaches
    a node that just replied seconds late; this runs the same SuperNode with a pause that starts at
    --min-pause and backs off to Flower's 3 s while idle.
    """
    from fedge.client.supernode import run_supernode

    run_supernode(ctx.args, min_pause=min_pause, reply_pause=reply_pause)


def register(app: typer.Typer) -> None:
    app.command("node-data")(node_data)
    app.command()(clientapp)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(supernode)
