"""From a federation's final state to what the edge serves: the merged model and the fleet's test data."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from fedge.adapters import merged_copy
from fedge.federated_model import build_federated_model, load_exchanged_state
from fedge.methods import get_method
from fedge.runconfig import RunSettings
from fedge.scenario import load_scenario
from fedge.state import from_record


def final_model(config: dict[str, Any], arrays: ArrayRecord) -> nn.Module:
    """The global model of a finished run, adapters merged into an fp32 copy of the base."""
    settings = RunSettings.from_config(config)
    method = get_method(settings.method)
    scenario = load_scenario(settings.scenario, **settings.scenario_options())
    model = build_federated_model(scenario, method, settings)
    load_exchanged_state(model, method, from_record(arrays))
    return merged_copy(model)


def fleet_test_data(config: dict[str, Any]) -> TensorDataset:
    """The union of the clients' target-domain test splits: what the edge fleet will see."""
    settings = RunSettings.from_config(config)
    scenario = load_scenario(settings.scenario, **settings.scenario_options())
    parts = [scenario.client_data(p, settings.num_clients).test for p in range(settings.num_clients)]
    return TensorDataset(torch.cat([p.tensors[0] for p in parts]), torch.cat([p.tensors[1] for p in parts]))
