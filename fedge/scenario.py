"""The scenario interface and its registry.

A scenario brings its data (each client's shard of the target domain), its
device tiers and its model: the pretrained base (its own architecture) and the
modules LoRA goes into. Scenarios live in `fedge.sim` or in third-party
packages and are found by name (`register_scenario`, the `fedge.scenarios`
entry-point group, or a module named in FEDGE_PLUGINS), so a client or server
never imports the simulation package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.registry import Registry
from fedge.tiers import DeviceTier

Task = Literal["classification", "causal-lm"]


@dataclass
class ClientData:
    """One client's shard: its own train and test split of the target domain, and its device tier."""

    train: TensorDataset
    test: TensorDataset
    tier: DeviceTier
    shift: dict[str, float] = field(default_factory=dict)


class Scenario(Protocol):
    name: str
    #: a name for the base model's architecture (recorded in results and artifacts)
    architecture: str
    task: Task
    num_classes: int
    #: one input sample's shape (what a node's own data must match)
    sample_shape: tuple[int, ...]
    #: modules of the base model that LoRA is injected into (peft `target_modules`)
    lora_targets: Sequence[str]

    def base_model(self) -> nn.Module:
        """The pretrained source-domain model (trained once, cached, seeded)."""
        ...

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData: ...

    def describe(self, num_partitions: int) -> dict[str, Any]: ...


SCENARIOS: Registry[Callable[..., Scenario]] = Registry("scenario", "fedge.scenarios")


def register_scenario(name: str, factory: Callable[..., Scenario] | str) -> None:
    """Add a scenario: a class or factory taking the run's scenario options (seed, alpha), or its "module:attr"."""
    SCENARIOS.register(name, factory)


def available() -> list[str]:
    return SCENARIOS.names()


@lru_cache(maxsize=8)
def _load(name: str, options: tuple[tuple[str, Any], ...]) -> Scenario:
    return SCENARIOS.get(name)(**dict(options))


def load_scenario(name: str, **options: Any) -> Scenario:
    """Instantiate a scenario by name (cached per process, since data prep is not free)."""
    return _load(name, tuple(sorted(options.items())))


def fleet_test_data(scenario: Scenario, num_partitions: int) -> TensorDataset:
    """The union of the clients' target-domain test splits: what the edge fleet will see."""
    parts = [scenario.client_data(p, num_partitions).test for p in range(num_partitions)]
    return TensorDataset(*(torch.cat([p.tensors[i] for p in parts]) for i in range(len(parts[0].tensors))))
