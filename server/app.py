"""The fedge ServerApp.

`flwr run .` loads the module-level `app`: it logs each round to Flower's run
log (`flwr log`) and writes the run's results.json. `fedge run` builds one with
`make_server_app` so it can override the run config, follow the rounds and
write one results.json for all the methods it runs.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.methods import resolve
from fedge.results import method_results, set_aside, write_results
from fedge.server.federation import FederationOutcome, RoundCallback, run_federation

log = logging.getLogger("fedge.server")


def log_to_flower() -> None:
    """Send fedge's INFO lines (one per round: accuracy, bytes) through Flower's console handler, so the
    run's log (`flwr log RUN_ID`) shows them beside Flower's own."""
    from flwr.common.logger import console_handler

    fedge_log = logging.getLogger("fedge")
    fedge_log.setLevel(logging.INFO)
    if console_handler not in fedge_log.handlers:
        fedge_log.addHandler(console_handler)
        fedge_log.propagate = False


def make_server_app(
    overrides: dict[str, Any] | None = None,
    on_round: RoundCallback | None = None,
    outcomes: list[FederationOutcome] | None = None,
    record: bool = True,
    flower_log: bool = False,
    errors: list[Exception] | None = None,
) -> ServerApp:
    """`record`: write this run's results.json into its out-dir (an earlier run's is set aside, never merged into);
    `flower_log`: log each round to Flower's log; `errors`: collect what the federation raised there instead of
    letting it reach Flower (which logs it with its traceback), for an in-process caller to raise."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            federate(grid, context)
        except Exception as err:
            if errors is None:
                raise
            errors.append(err)

    def federate(grid: Grid, context: Context) -> None:
        if flower_log:
            log_to_flower()
        config = {**dict(context.run_config), **(overrides or {})}
        spec = resolve(config)
        if "num-clients" not in config:
            spec.settings.num_clients = len(list(grid.get_node_ids())) or spec.settings.num_clients
        outcome = run_federation(grid, spec, on_round)
        if outcomes is not None:
            outcomes.append(outcome)
        if record:
            settings = spec.settings
            results = method_results(scenario=outcome.scenario, base_accuracy=outcome.base.accuracy,
                                     base_metrics=outcome.base_metrics, name=outcome.method, entry=outcome.entry)
            results["run"] = {"methods": [outcome.method], "rounds": settings.num_server_rounds,
                              "clients": settings.num_clients, "seconds": outcome.final["seconds"],
                              "flower_run_id": context.run_id}
            kept = set_aside(settings.out_dir)
            if kept is not None:
                log.warning("%s held an earlier run's results.json: kept as %s", settings.out_dir, kept.name)
            path = write_results(settings.out_dir, results)
            log.info("wrote %s", path)

    return server_app


app = make_server_app(flower_log=True)
