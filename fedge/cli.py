"""The `fedge` command line: one typer app whose subcommands live beside the feature they drive.

Nothing imports this module; it imports each role's CLI module, and those import
their heavy dependencies inside the commands, so `fedge edge agent` starts
without a training stack.
"""

from __future__ import annotations

import typer

from fedge.client import cli as client_cli
from fedge.edge import cli as edge_cli
from fedge.server import cli as server_cli
from fedge.sim import cli as sim_cli

app = typer.Typer(help="fedge: federated and edge adaptation of models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
sim_cli.register(app)
server_cli.register(app)
client_cli.register(app)
edge_cli.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
