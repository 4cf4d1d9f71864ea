"""The fedge ServerApp.

`flwr run .` loads the module-level `app`; `fedge run` builds one with
`make_server_app` so it can override the run config and follow the rounds.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.methods import resolve
from fedge.server.federation import FederationOutcome, RoundCallback, run_federation


def make_server_app(
    overrides: dict[str, Any] | None = None,
    on_round: RoundCallback | None = None,
    outcomes: list[FederationOutcome] | None = None,
    log_to_flower: bool = False,
) -> ServerApp:
    """The ServerApp; `log_to_flower` sends fedge's INFO lines (a line per message) to Flower's log handlers,
    which is what `flwr log` shows of a deployed run."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if log_to_flower:
            fedge_log = logging.getLogger("fedge")
            fedge_log.setLevel(logging.INFO)
            for handler in logging.getLogger("flwr").handlers:
                if handler not in fedge_log.handlers:
                    fedge_log.addHandler(handler)
        config = {**dict(context.run_config), **(overrides or {})}
        spec = resolve(config)
        if "num-clients" not in config:
            spec.settings.num_clients = len(list(grid.get_node_ids())) or spec.settings.num_clients
        outcome = run_federation(grid, spec, on_round)
        if outcomes is not None:
            outcomes.append(outcome)

    return server_app


app = make_server_app(log_to_flower=True)
