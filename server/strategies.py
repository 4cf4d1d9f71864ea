"""Strategy per method: a method's `strategy` name maps to a factory here."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, Strategy

from fedge.methods import Method
from fedge.runconfig import RunSettings
from fedge.server.strategy_fedit import FedITStrategy


def sampling(settings: RunSettings) -> dict[str, float | int]:
    """Flower's client-sampling knobs from fedge's clients / clients-per-round."""
    per_round = settings.clients_per_round or settings.num_clients
    return {
        "fraction_train": per_round / settings.num_clients,
        "min_train_nodes": per_round,
        "fraction_evaluate": 1.0,
        "min_evaluate_nodes": settings.num_clients,
        "min_available_nodes": settings.num_clients,
    }


StrategyFactory = Callable[[Method, RunSettings], Strategy]

FACTORIES: dict[str, StrategyFactory] = {
    "fedavg": lambda method, s: FedITStrategy(**sampling(s)) if method.payload == "lora" else FedAvg(**sampling(s)),
}


def build_strategy(method: Method, settings: RunSettings) -> Strategy:
    try:
        factory = FACTORIES[method.strategy]
    except KeyError as err:
        raise ValueError(f"method {method.name} names unknown strategy {method.strategy!r}") from err
    return factory(method, settings)
