"""Run a federation under Flower's simulation runtime (Ray backend), one method at a time."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from fedge.server.federation import FederationOutcome


class _DropDeprecation(logging.Filter):
    """`run_simulation` is the documented in-process entry point; its deprecation notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def simulate(
    settings: dict[str, Any],
    on_round: Callable[[str, dict[str, Any]], None] | None = None,
    cpus: int | None = None,
    gpus_per_client: float = 0.0,
    record: bool = True,
) -> FederationOutcome:
    """Run one method's federation with `settings` (run-config keys) over Flower's stock ServerApp/ClientApp.

    `record`: the ServerApp writes this run's results.json (`fedge run` writes one for all its methods instead).
    """
    from flwr.simulation import run_simulation

    from fedge.client.app import app as client_app
    from fedge.server.app import make_server_app

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecation())
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    outcomes: list[FederationOutcome] = []
    errors: list[Exception] = []
    server_app = make_server_app(settings, on_round=on_round, outcomes=outcomes, record=record, errors=errors)
    cpus = cpus or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus_per_client},
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
    }
    run_simulation(server_app, client_app, num_supernodes=int(settings["num-clients"]), backend_config=backend)
    if errors:
        raise errors[0]  # as the federation raised it (a RoundFailed says which round and why)
    if not outcomes:
        raise RuntimeError(f"the federation for {settings.get('method')} ended without a result (see the log above)")
    return outcomes[0]
