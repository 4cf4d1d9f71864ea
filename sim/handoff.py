"""From a simulated federation's final state to what the edge serves: the merged model and the fleet's test data."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from fedge.federated_model import merged_copy
from fedge.methods import resolve
from fedge.scenario import fleet_test_data, scenario_for
from fedge.state import from_record


def final_model(config: dict[str, Any], arrays: ArrayRecord) -> nn.Module:
    """The global model of a finished run, adapters merged into an fp32 copy of the base."""
    spec = resolve(config)
    scenario = scenario_for(spec.settings)
    model = spec.method.build_model(scenario, spec.settings)
    spec.method.load_state(model, from_record(arrays))
    return merged_copy(model)


def fleet_data(config: dict[str, Any]) -> TensorDataset:
    """The union of the run's clients' target-domain test splits."""
    spec = resolve(config)
    scenario = scenario_for(spec.settings)
    return fleet_test_data(scenario, spec.settings.num_clients)
