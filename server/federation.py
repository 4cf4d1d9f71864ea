"""The round loop: configure, send, receive, aggregate, evaluate, account bytes, checkpoint.

Flower's `Strategy.start` runs the same steps; fedge keeps its own loop so that
every round's wire bytes, fleet accuracy and checkpoint are recorded at the
point they happen, and so that a real fleet's failures are handled where they
show: a node that vanishes costs at most `round-timeout`, a round with fewer
than `min-replies` replies is sent again (`round-retries` times), and a
restarted server continues after the last checkpointed round.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.errors import UserError
from fedge.federated_model import count_params
from fedge.message_timing import append_rows, summarise
from fedge.messages import METRICS_RECORD, scalar, total_wire_bytes
from fedge.methods import RunSpec
from fedge.results import ClientEval, FleetAccuracy, fleet_accuracy, task_metrics, traffic, traffic_summary
from fedge.scenario import scenario_for
from fedge.server.adapters_out import write_adapter
from fedge.server.checkpoints import RunCheckpoints
from fedge.server.nodes import PollingGrid, connected_view, in_partition_order, required_replies, wait_for_nodes
from fedge.settings import RunSettings
from fedge.state import from_record, to_record

log = logging.getLogger("fedge.server")

#: the line each round logs (Flower's run log shows it; `fedge deploy-local` follows it for its progress bar)
ROUND_LINE = "%s round %d/%d: accuracy %.4f, uplink %.1f KB, downlink %.1f KB, %d of %d clients"
ROUND_PATTERN = re.compile(r"(\S+) round (\d+)/(\d+): accuracy ([0-9.]+)")

RoundCallback = Callable[[str, dict[str, Any]], None]


class RoundFailed(UserError):
    """Too few replies even after the allowed retries; the checkpoint keeps every earlier round."""


@dataclass
class FederationOutcome:
    method: str
    base: FleetAccuracy
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    #: results.json's parts: the scenario's description and this method's entry (rounds, final, checkpoint...)
    scenario: dict[str, Any] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)
    #: the base model's task metrics beside its accuracy (a causal LM's perplexity)
    base_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainRound:
    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    replies: int
    sent: int
    attempts: int
    uplink: int
    downlink: int


def evaluation_panel(settings: RunSettings, nodes: list[int]) -> list[int] | None:
    """The nodes evaluated after each round: a seeded sample of `eval_count()` nodes, fixed for the run so that
    rounds compare on the same clients; None when that is every node."""
    count = settings.eval_count()
    if count >= len(nodes):
        return None
    return sorted(random.Random(settings.seed).sample(sorted(nodes), count))


def evaluate_fleet(strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                   timeout: float, panel: list[int] | None = None) -> FleetAccuracy:
    """Fleet accuracy over the nodes connected now (those of `panel` only, if given); a node that does not answer
    in time is left out."""
    connected = set(grid.get_node_ids())
    nodes = sorted(connected) if panel is None else [n for n in panel if n in connected]
    if not nodes:
        log.warning("round %d: no node connected for evaluation", server_round)
        return fleet_accuracy([])
    with connected_view(strategy, grid, nodes) as view:
        messages = list(strategy.configure_evaluate(server_round, arrays, config, view))
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    evals = []
    for reply in replies:
        if reply.has_error():
            log.warning("evaluation reply from node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        m = reply.content.metric_records[METRICS_RECORD]
        counts = (int(scalar(m[k])) for k in ("partition-id", "num-examples", "correct", "personal-correct"))
        losses = (float(scalar(m[k])) if k in m else float("nan") for k in ("loss-sum", "personal-loss-sum"))
        evals.append(ClientEval(*counts, *losses))
    if len(evals) < len(messages):
        log.warning("round %d: %d of %d nodes evaluated", server_round, len(evals), len(messages))
    return fleet_accuracy(evals)


def train_round(strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                settings: RunSettings) -> TrainRound:
    """Send the round to the connected nodes; aggregate what arrives if enough did, else send it again."""
    uplink = downlink = 0
    for attempt in range(1, settings.round_retries + 2):
        nodes = list(grid.get_node_ids()) or wait_for_nodes(grid, 1, settings.node_wait)
        with connected_view(strategy, grid, nodes) as view:
            messages: list[Message] = list(strategy.configure_train(server_round, arrays, config, view))
        downlink += total_wire_bytes(messages)
        replies = in_partition_order(grid.send_and_receive(messages, timeout=settings.round_timeout))
        ok = [r for r in replies if not r.has_error()]
        uplink += total_wire_bytes(ok)
        for r in replies:
            if r.has_error():
                log.warning("round %d: node %s failed: %s", server_round, r.metadata.src_node_id, r.error.reason)
        need = required_replies(settings.min_replies, len(messages))
        if messages and len(ok) >= need:
            if len(ok) < len(messages):
                log.warning("round %d: aggregating %d of %d replies (%d needed)", server_round, len(ok),
                            len(messages), need)
            aggregated, metrics = strategy.aggregate_train(server_round, replies)
            return TrainRound(aggregated, metrics, len(ok), len(messages), attempt, uplink, downlink)
        log.warning("round %d attempt %d: %d of %d replies, %d needed; %s", server_round, attempt, len(ok),
                    len(messages), need, "retrying" if attempt <= settings.round_retries else "giving up")
    raise RoundFailed(f"round {server_round}: too few replies after {settings.round_retries + 1} attempts",
                      "the nodes' errors are in the log; the checkpoint keeps every earlier round (resume from it)")


def run_federation(grid: Grid, spec: RunSpec, on_round: RoundCallback | None = None) -> FederationOutcome:
    started = time.perf_counter()
    settings, method = spec.settings, spec.method
    grid = PollingGrid(grid)
    message_log = Path(settings.out_dir) / f"messages-{method.name}.jsonl"  # one line per reply: its timeline
    scenario = scenario_for(settings)
    method.check_scenario(scenario)
    model = method.build_model(scenario, settings)
    initial = method.exchanged_state(model)
    arrays = to_record(initial)
    strategy = method.strategy(spec, initial)
    config = ConfigRecord(spec.to_config())
    checkpoints = RunCheckpoints(settings, spec.to_config())

    nodes = wait_for_nodes(grid, settings.num_clients, settings.node_wait)
    if len(nodes) < required_replies(settings.min_replies, settings.num_clients):
        raise RoundFailed(f"only {len(nodes)} of {settings.num_clients} nodes connected within {settings.node_wait}s",
                          "start the missing SuperNodes, or lower num-clients")

    resumed = checkpoints.resume(strategy)
    if resumed is None:
        message_log.unlink(missing_ok=True)  # a fresh run's log holds that run only
    rows: list[dict[str, Any]] = []
    totals = {"uplink_bytes": 0, "downlink_bytes": 0}
    if resumed is not None:
        arrays = to_record(resumed.arrays)
        base, fleet = FleetAccuracy(**resumed.base), FleetAccuracy(**resumed.fleet)
        rows, totals = resumed.rows, {**totals, **resumed.totals}
        first_round = resumed.server_round + 1
    else:  # the base model on every client, like the final model (rounds between use the panel)
        base = evaluate_fleet(strategy, 0, arrays, config, grid, settings.round_timeout)
        fleet, first_round = base, 1
        log.info("%s: base accuracy %.4f on %d clients", method.name, base.accuracy, base.clients)
    outcome = FederationOutcome(method=method.name, base=base, rounds=rows)
    logged = 0  # timings already in the message log

    panel = evaluation_panel(settings, nodes)
    if panel is not None:
        log.info("%s: evaluating %d of %d clients after each round, all of them after the last", method.name,
                 len(panel), len(nodes))
    for server_round in range(first_round, settings.num_server_rounds + 1):
        round_started = time.perf_counter()
        result = train_round(strategy, server_round, arrays, config, grid, settings)
        if result.arrays is not None:
            arrays = result.arrays
        trained = time.perf_counter()
        last = server_round == settings.num_server_rounds
        fleet = evaluate_fleet(strategy, server_round, arrays, config, grid, settings.round_timeout,
                               None if last else panel)
        totals["uplink_bytes"] += result.uplink
        totals["downlink_bytes"] += result.downlink
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": fleet.accuracy,
            "personalized_accuracy": fleet.personalized_accuracy,
            **task_metrics(scenario.task, fleet),
            "uplink_bytes": result.uplink,
            "downlink_bytes": result.downlink,
            **traffic(result.uplink, result.downlink, totals["uplink_bytes"], totals["downlink_bytes"]),
            "clients": result.replies,
            "sent": result.sent,
            "attempts": result.attempts,
            "eval_clients": fleet.clients,
            "round_seconds": time.perf_counter() - round_started,
            "train_seconds": trained - round_started,
            "eval_seconds": time.perf_counter() - trained,
            "finished_at": time.time(),
        }
        if result.metrics is not None:
            row.update({k.replace("-", "_"): scalar(v) for k, v in result.metrics.items() if k != "partition-id"})
        rows.append(row)
        log.info(ROUND_LINE, method.name, server_round, settings.num_server_rounds, fleet.accuracy,
                 result.uplink / 1e3, result.downlink / 1e3, result.replies, result.sent)
        append_rows(message_log, grid.timings[logged:])
        logged = len(grid.timings)
        checkpoints.commit(server_round, from_record(arrays), strategy, rows, totals, base, fleet)
        if on_round is not None:
            on_round(method.name, row)

    outcome.arrays = arrays
    outcome.final = {
        "accuracy": fleet.accuracy,
        "personalized_accuracy": fleet.personalized_accuracy,
        "bottom_decile_accuracy": fleet.bottom_decile_accuracy,
        **task_metrics(scenario.task, fleet),
        "uplink_bytes": totals["uplink_bytes"],
        "downlink_bytes": totals["downlink_bytes"],
        **traffic_summary(totals["uplink_bytes"], totals["downlink_bytes"], len(rows)),
        "trainable_params": count_params(model, trainable_only=True),
        "total_params": count_params(model),
        "seconds": time.perf_counter() - started,
    }
    entry: dict[str, Any] = {"summary": method.summary, "rounds": outcome.rounds, "final": outcome.final}
    adapter = write_adapter(model, method, arrays, scenario, settings.out_dir)
    if adapter is not None:
        entry["adapter"] = adapter
    finish = getattr(strategy, "finish", None)
    if callable(finish):  # a strategy's after-federation step (pFedGate: novel clients join) adds its own fields
        entry.update(finish(grid, arrays, config))
    append_rows(message_log, grid.timings[logged:])
    entry["per_message_overhead_s"] = summarise(grid.timings)
    if checkpoints.enabled:
        entry["checkpoint"] = checkpoints.describe(first_round - 1)
    outcome.entry = entry
    outcome.scenario = {**scenario.describe(settings.num_clients), "task": scenario.task}
    outcome.base_metrics = task_metrics(scenario.task, base)
    return outcome
