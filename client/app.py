"""The fedge ClientApp: local adapter training and evaluation on the client's own shard.

Everything method-specific comes from the server's ConfigRecord (the server is
the single source of truth for a run); the client's partition comes from its
node config (`partition-id`, `num-partitions`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.device import resolve_device
from fedge.federated_model import build_federated_model, exchanged_state, load_exchanged_state
from fedge.methods import get_method
from fedge.runconfig import RunSettings
from fedge.scenario import ClientData, load_scenario
from fedge.state import from_record, to_record
from fedge.training import evaluate, train_epochs

app = ClientApp()


def _settings(msg: Message) -> RunSettings:
    config = msg.content.config_records.get("config", ConfigRecord())
    return RunSettings.from_config(dict(config))


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError("node config must set partition-id and num-partitions") from err


@lru_cache(maxsize=4)
def _client_data(scenario: str, options: tuple, partition_id: int, num_partitions: int) -> ClientData:
    return load_scenario(scenario, **dict(options)).client_data(partition_id, num_partitions)


def _prepare(msg: Message, context: Context):
    settings = _settings(msg)
    torch.set_num_threads(max(1, settings.client_threads))
    method = get_method(settings.method)
    pid, num = _partition(context)
    scenario = load_scenario(settings.scenario, **settings.scenario_options())
    data = _client_data(settings.scenario, tuple(sorted(settings.scenario_options().items())), pid, num)
    model = build_federated_model(scenario, method, settings)
    global_state = from_record(msg.content.array_records["arrays"])
    load_exchanged_state(model, method, global_state)
    return settings, method, pid, data, model, global_state


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings, method, pid, data, model, _ = _prepare(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    stats = train_epochs(
        model, data.train, epochs=settings.local_epochs, lr=settings.lr or method.lr, batch_size=settings.batch_size,
        device=resolve_device(settings.device), seed=settings.seed * 100_003 + server_round * 1_009 + pid,
    )
    new_state = exchanged_state(model.cpu(), method)
    metrics = MetricRecord({"num-examples": stats.num_examples, "train-loss": stats.loss, "partition-id": pid})
    return Message(RecordDict({"arrays": to_record(new_state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    settings, _, pid, data, model, _ = _prepare(msg, context)
    result = evaluate(model, data.test, device=resolve_device(settings.device))
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "correct": result.correct,
        "accuracy": result.accuracy,
        # Methods without a personal model serve the global one.
        "personal-correct": result.correct,
        "mean-entropy": result.mean_entropy,
        "partition-id": pid,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
