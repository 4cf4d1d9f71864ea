"""The scenario interface and its plug-in registry.

Scenarios (data sets, partitions, device profiles, the base model) live in
`fedge.sim` or in third-party packages; roles find them by name through the
`fedge.scenarios` entry-point group, so a client or server never imports the
simulation package directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Protocol

from torch import nn
from torch.utils.data import TensorDataset

from fedge.profiles import DeviceProfile


@dataclass
class ClientData:
    """One client's shard: its own train and test split of the target domain."""

    train: TensorDataset
    test: TensorDataset
    profile: DeviceProfile
    shift: dict[str, float] = field(default_factory=dict)


class Scenario(Protocol):
    name: str
    architecture: str
    num_classes: int
    #: one input sample's shape (what a node's own data must match)
    sample_shape: tuple[int, ...]

    def base_model(self) -> nn.Module:
        """The pretrained source-domain model (trained once, cached, seeded)."""
        ...

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData: ...

    def describe(self, num_partitions: int) -> dict[str, Any]: ...


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="fedge.scenarios"))


@lru_cache(maxsize=8)
def _load(name: str, options: tuple[tuple[str, Any], ...]) -> Scenario:
    matches = [ep for ep in entry_points(group="fedge.scenarios") if ep.name == name]
    if not matches:
        raise ValueError(f"unknown scenario {name!r}; installed: {available()}")
    factory = matches[0].load()
    return factory(**dict(options))


def load_scenario(name: str, **options: Any) -> Scenario:
    """Instantiate a scenario by name (cached per process, since data prep is not free)."""
    return _load(name, tuple(sorted(options.items())))
