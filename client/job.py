"""One message's job on a node: the run resolved from the server's config, this node's data, and the
model loaded with the global state the message carries."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message

from fedge.client.node_data import NodeDataError, load_node_data, node_tier
from fedge.messages import CONFIG_RECORD, SERVER_ROUND_KEY
from fedge.methods import Job, RunSpec, resolve
from fedge.methods.downlink import receive_global
from fedge.scenario import ClientData, load_scenario, scenario_for, scenario_options
from fedge.settings import RunSettings
from fedge.tiers import tier_for
from fedge.training import resolve_device


def partition(context: Context) -> tuple[int, int]:
    """This node's (partition-id, num-partitions) from its node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError("node config must set partition-id and num-partitions") from err


def run_spec(msg: Message) -> RunSpec:
    return resolve(dict(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())))


@lru_cache(maxsize=4)
def _client_data(scenario: str, options: tuple[tuple[str, Any], ...], partition_id: int, num_partitions: int) -> ClientData:
    return load_scenario(scenario, **dict(options)).client_data(partition_id, num_partitions)


def node_data(context: Context, settings: RunSettings) -> ClientData:
    """The node's own data when its node config names a `data-path` (a real device), else its scenario partition.

    A node with its own data takes its tier from node config `tier` (default: the partition's).
    """
    pid, num = partition(context)
    options = scenario_options(settings)
    path = context.node_config.get("data-path")
    if not path:
        return _client_data(settings.scenario, tuple(sorted(options.items())), pid, num)
    scenario = load_scenario(settings.scenario, **options)
    if scenario.task != "classification":
        raise NodeDataError(f"node data {path}: a node's own .npz holds labelled samples (x, y) for a classifier; "
                            f"scenario {scenario.name!r} is {scenario.task}, whose clients' text comes from its own "
                            "options (a model and data of your own: scenario 'hf', --data)")
    name = context.node_config.get("tier")
    tier = node_tier(str(name)) if name else tier_for(pid)
    return load_node_data(Path(str(path)), tier, tuple(scenario.sample_shape), scenario.num_classes)


def prepare_job(msg: Message, context: Context, *, training: bool = True) -> Job:
    """The job of one message; for evaluation, without peft where the method allows (`Method.evaluation_model`)."""
    spec = run_spec(msg)
    settings, method = spec.settings, spec.method
    torch.set_num_threads(max(1, settings.client_threads))
    pid, _ = partition(context)
    scenario = scenario_for(settings)
    data = node_data(context, settings)
    plain = None if training else method.evaluation_model(scenario, settings, msg)
    if plain is not None:
        model, global_state = plain
    else:
        model = method.build_model(scenario, settings)
        global_state = receive_global(msg, context, method, spec, method.exchanged_state(model))
        method.load_state(model, global_state)
    server_round = int(msg.content.config_records.get(CONFIG_RECORD, ConfigRecord()).get(SERVER_ROUND_KEY, 0))
    return Job(spec, pid, data, scenario, model, global_state, server_round, resolve_device(settings.device))
