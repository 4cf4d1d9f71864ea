"""`fedge node-data`: a scenario's partitions as node-data files, to try SuperNodes that read their own data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import track

from fedge.console import console


def node_data(
    folder: Annotated[Path, typer.Argument(help="where to write node-<i>.npz")],
    clients: Annotated[int, typer.Option(help="partitions to write")] = 3,
    scenario: str = "digits-shift",
    seed: int = 0,
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew concentration")] = 0.5,
) -> None:
    """Write each scenario partition as a node-data file, for SuperNodes started with `data-path` in their node config."""
    from fedge.client.node_data import save_node_data
    from fedge.scenario import scenario_for
    from fedge.settings import RunSettings

    try:
        chosen = scenario_for(RunSettings(scenario=scenario, seed=seed, alpha=alpha))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if chosen.task != "classification":
        raise typer.BadParameter(f"node-data files hold labelled samples for a classifier; {scenario} is {chosen.task}",
                                 param_hint="--scenario")
    for i in track(range(clients), description="partitions", console=console):
        save_node_data(folder / f"node-{i}.npz", chosen.client_data(i, clients))
    console.print(f"wrote {clients} node-data files to {folder}")


def register(app: typer.Typer) -> None:
    app.command("node-data")(node_data)
