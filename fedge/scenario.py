"""The scenario interface and its registry.

A scenario brings its data (each client's shard of the target domain), its
device tiers and its model: the pretrained base (its own architecture) and the
modules LoRA goes into. Scenarios live in `fedge.sim` or in third-party
packages and are found by name (`register_scenario`, the `fedge.scenarios`
entry-point group, or a module named in FEDGE_PLUGINS), so a client or server
never imports the simulation package.

A scenario's task decides what a split holds and how it is scored
(`fedge.training`): `classification` splits are `(*inputs, labels)` and score
accuracy; `causal-lm` splits are `(input_ids, attention_mask)` (int64) and
score loss, perplexity and next-token accuracy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.registry import Registry
from fedge.settings import RunSettings
from fedge.tiers import DeviceTier
from fedge.training import Task


@dataclass
class ClientData:
    """One client's shard: its own train and test split of the target domain, and its device tier."""

    train: TensorDataset
    test: TensorDataset
    tier: DeviceTier
    shift: dict[str, float] = field(default_factory=dict)


class Scenario(Protocol):
    """What every scenario has. Text scenarios also have `tokenizer()` (a Hugging Face tokenizer); a scenario
    whose model gets a new head also names it in `modules_to_save` (trained and exchanged whole beside LoRA);
    one built on a model the user keeps elsewhere names it in `base_reference` (a local path or hub id); one whose
    data is meant for a number of local epochs per round names it in `local_epochs` (`fedge run`'s default)."""

    name: str
    #: a name for the base model's architecture (recorded in results and artifacts)
    architecture: str
    task: Task
    #: classes (classification) or the vocabulary size (causal-lm)
    num_classes: int
    #: one input sample's shape (what a node's own data must match; a causal LM's: its sequence length)
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
    """Add a scenario: a class or factory taking the run's scenario options it names (seed, alpha, model, data,
    ...; `RunSettings.scenario_options`), or its "module:attr"."""
    SCENARIOS.register(name, factory)


def available() -> list[str]:
    return SCENARIOS.names()


@lru_cache(maxsize=8)
def _load(name: str, options: tuple[tuple[str, Any], ...]) -> Scenario:
    return SCENARIOS.get(name)(**dict(options))


def load_scenario(name: str, **options: Any) -> Scenario:
    """Instantiate a scenario by name (cached per process, since data prep is not free)."""
    return _load(name, tuple(sorted(options.items())))


def default_local_epochs(name: str) -> int | None:
    """The local epochs per round a scenario's data is meant for (a `local_epochs` attribute of its class), if it
    names them: `fedge run` uses them unless told otherwise."""
    value = getattr(SCENARIOS.get(name), "local_epochs", None)
    return int(value) if value else None


def scenario_options(settings: RunSettings) -> dict[str, Any]:
    """The options of `settings` that its scenario takes: the parameters its factory names (all, for a factory
    taking **options). Any other option is refused unless it is at its default; `seed` never is (the run uses
    it for LoRA's init and the clients' shuffling whatever the scenario does with it)."""
    factory = SCENARIOS.get(settings.scenario)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered, defaults = settings.scenario_options(), RunSettings().scenario_options()
    taken = {k: v for k, v in offered.items() if takes_any or k in params}
    unused = sorted(k for k, v in offered.items() if k not in taken and k != "seed" and v != defaults[k])
    if unused:
        named = ", ".join(f"{k.replace('_', '-')}={offered[k]!r}" for k in unused)
        hint = "; a model and data of your own make scenario 'hf' (fedge run --model ... --data ...)" if {
            "model", "data"} & set(unused) else ""
        raise ValueError(f"scenario {settings.scenario!r} does not use {named}; it takes "
                         f"{', '.join(k.replace('_', '-') for k in taken) or 'no options'}{hint}")
    return taken


def scenario_for(settings: RunSettings) -> Scenario:
    """The run's scenario, built from the options it takes (the same on the server and every client)."""
    return load_scenario(settings.scenario, **scenario_options(settings))


def fleet_test_data(scenario: Scenario, num_partitions: int) -> TensorDataset:
    """The union of the clients' target-domain test splits: what the edge fleet will see."""
    parts = [scenario.client_data(p, num_partitions).test for p in range(num_partitions)]
    return TensorDataset(*(torch.cat([p.tensors[i] for p in parts]) for i in range(len(parts[0].tensors))))
