"""Strategy per method: a method's `strategy` name maps to a factory here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.serverapp.strategy import FedAvg, Strategy

from fedge.methods import Method
from fedge.runconfig import RunSettings
from fedge.server.strategy_blockavg import BlockAvgStrategy
from fedge.server.strategy_compressed import CompressedFedAvg
from fedge.server.strategy_fedit import FedITStrategy
from fedge.server.strategy_flasc import FlascStrategy


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


StrategyFactory = Callable[[Method, RunSettings, dict[str, np.ndarray]], Strategy]

FACTORIES: dict[str, StrategyFactory] = {
    "fedavg": lambda method, s, _: FedITStrategy(**sampling(s)) if method.payload == "lora" else FedAvg(**sampling(s)),
    "compressed": lambda method, s, _: CompressedFedAvg(max_update_bytes=s.max_update_bytes, **sampling(s)),
    "flasc": lambda method, s, initial: FlascStrategy(
        initial=initial, density_down=s.density_down, server_opt=s.server_opt, server_lr=s.server_lr,
        max_update_bytes=s.max_update_bytes, **sampling(s)),
    "blockavg": lambda method, s, initial: BlockAvgStrategy(
        initial=initial, splits=s.gate_splits, novel_clients=s.novel_clients, timeout=s.round_timeout, seed=s.seed,
        **sampling(s)),
}


def build_strategy(method: Method, settings: RunSettings, initial: dict[str, np.ndarray]) -> Strategy:
    """`initial` is the exchanged state the run starts from (FLASC's download is relative to it)."""
    try:
        factory = FACTORIES[method.strategy]
    except KeyError as err:
        raise ValueError(f"method {method.name} names unknown strategy {method.strategy!r}") from err
    return factory(method, settings, initial)
