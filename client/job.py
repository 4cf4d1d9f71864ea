"""What a client needs to act on one server message: settings, method, its data, the model loaded with the global state."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from torch import nn

from fedge.device import resolve_device
from fedge.federated_model import build_federated_model, exchanged_state, load_exchanged_state
from fedge.methods import Method, get_method
from fedge.node_data import load_node_data, tier_profile
from fedge.profiles import tier_for
from fedge.runconfig import RunSettings
from fedge.scenario import ClientData, Scenario, load_scenario
from fedge.sparse_download import DOWNLOAD_RECORD, decode_download
from fedge.state import from_record
from fedge.update_record import envelope_bytes


@dataclass
class Job:
    settings: RunSettings
    method: Method
    partition_id: int
    data: ClientData
    scenario: Scenario
    model: nn.Module
    global_state: dict[str, np.ndarray]
    server_round: int
    device: torch.device

    @property
    def seed(self) -> int:
        """Distinct per run, round and client, reproducible across reruns."""
        return self.settings.seed * 100_003 + self.server_round * 1_009 + self.partition_id


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError("node config must set partition-id and num-partitions") from err


@lru_cache(maxsize=4)
def _client_data(scenario: str, options: tuple[tuple[str, Any], ...], partition_id: int, num_partitions: int) -> ClientData:
    return load_scenario(scenario, **dict(options)).client_data(partition_id, num_partitions)


def node_data(context: Context, settings: RunSettings) -> ClientData:
    """The node's own data when its node config names a `data-path` (a real device), else its scenario partition.

    A node with its own data takes its tier from node config `tier` (default: the partition's).
    """
    pid, num = _partition(context)
    options = settings.scenario_options()
    path = context.node_config.get("data-path")
    if not path:
        return _client_data(settings.scenario, tuple(sorted(options.items())), pid, num)
    scenario = load_scenario(settings.scenario, **options)
    tier = context.node_config.get("tier")
    profile = tier_profile(str(tier)) if tier else tier_for(pid)
    return load_node_data(Path(str(path)), profile, tuple(scenario.sample_shape), scenario.num_classes)


def prepare_job(msg: Message, context: Context) -> Job:
    config = msg.content.config_records.get("config", ConfigRecord())
    settings = RunSettings.from_config(dict(config))
    torch.set_num_threads(max(1, settings.client_threads))
    method = get_method(settings.method)
    pid, _ = _partition(context)
    scenario = load_scenario(settings.scenario, **settings.scenario_options())
    data = node_data(context, settings)
    model = build_federated_model(scenario, method, settings)
    if DOWNLOAD_RECORD in msg.content.array_records:  # sparse download: init + the top changes
        envelope = envelope_bytes(msg.content, DOWNLOAD_RECORD)
        global_state = decode_download(envelope, exchanged_state(model, method), settings.max_update_bytes)
    else:
        global_state = from_record(msg.content.array_records["arrays"])
    load_exchanged_state(model, method, global_state)
    return Job(settings, method, pid, data, scenario, model, global_state, int(config.get("server-round", 0)),
               resolve_device(settings.device))
