"""The round loop: configure, send, receive, aggregate, evaluate, account bytes.

Flower's `Strategy.start` runs the same steps; fedge keeps its own loop so that
every round's wire bytes, fleet accuracy and checkpoint are recorded at the
point they happen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.federated_model import build_federated_model, exchanged_state
from fedge.methods import get_method
from fedge.models import count_params
from fedge.results import ClientEval, FleetAccuracy, fleet_accuracy, record_method
from fedge.runconfig import RunSettings
from fedge.scenario import load_scenario
from fedge.server.strategies import build_strategy
from fedge.state import to_record
from fedge.wire import total_wire_bytes

log = logging.getLogger("fedge.server")

RoundCallback = Callable[[str, dict[str, Any]], None]


@dataclass
class FederationOutcome:
    method: str
    base: FleetAccuracy
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    arrays: ArrayRecord | None = None


def evaluate_fleet(strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                   timeout: float) -> FleetAccuracy:
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    replies = grid.send_and_receive(messages, timeout=timeout)
    evals = []
    for reply in replies:
        if reply.has_error():
            log.warning("evaluation reply from node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        m = reply.content.metric_records["metrics"]
        evals.append(ClientEval(int(m["partition-id"]), int(m["num-examples"]), int(m["correct"]), int(m["personal-correct"])))
    return fleet_accuracy(evals)


def run_federation(grid: Grid, settings: RunSettings, on_round: RoundCallback | None = None) -> FederationOutcome:
    started = time.perf_counter()
    method = get_method(settings.method)
    scenario = load_scenario(settings.scenario, **settings.scenario_options())
    model = build_federated_model(scenario, method, settings)
    initial = exchanged_state(model, method)
    arrays = to_record(initial)
    strategy = build_strategy(method, settings, initial)
    config = ConfigRecord(settings.to_config())

    base = evaluate_fleet(strategy, 0, arrays, config, grid, settings.round_timeout)
    outcome = FederationOutcome(method=method.name, base=base)
    log.info("%s: base accuracy %.4f on %d clients", method.name, base.accuracy, base.clients)
    uplink_total = downlink_total = 0
    fleet = base
    for server_round in range(1, settings.num_server_rounds + 1):
        messages: list[Message] = list(strategy.configure_train(server_round, arrays, config, grid))
        downlink = total_wire_bytes(messages)
        replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
        uplink = total_wire_bytes(r for r in replies if not r.has_error())
        for r in replies:
            if r.has_error():
                log.warning("round %d: node %s failed: %s", server_round, r.metadata.src_node_id, r.error.reason)
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        fleet = evaluate_fleet(strategy, server_round, arrays, config, grid, settings.round_timeout)
        uplink_total += uplink
        downlink_total += downlink
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": fleet.accuracy,
            "personalized_accuracy": fleet.personalized_accuracy,
            "uplink_bytes": uplink,
            "downlink_bytes": downlink,
            "clients": sum(1 for r in replies if not r.has_error()),
        }
        if train_metrics is not None:
            row.update({k.replace("-", "_"): float(v) for k, v in train_metrics.items() if k != "partition-id"})
        outcome.rounds.append(row)
        if on_round is not None:
            on_round(method.name, row)

    outcome.arrays = arrays
    outcome.final = {
        "accuracy": fleet.accuracy,
        "personalized_accuracy": fleet.personalized_accuracy,
        "bottom_decile_accuracy": fleet.bottom_decile_accuracy,
        "uplink_bytes": uplink_total,
        "downlink_bytes": downlink_total,
        "trainable_params": count_params(model, trainable_only=True),
        "total_params": count_params(model),
        "seconds": time.perf_counter() - started,
    }
    record_method(
        settings.out_dir,
        scenario=scenario.describe(settings.num_clients),
        base_accuracy=base.accuracy,
        name=method.name,
        entry={"summary": method.summary, "rounds": outcome.rounds, "final": outcome.final},
    )
    return outcome
