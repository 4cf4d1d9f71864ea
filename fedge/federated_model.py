"""The model a method federates, and the part of it that travels.

Server and clients build it the same way (base model from the scenario, LoRA
seeded identically), so only the exchanged state ever has to cross the wire.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from fedge.adapters import adapter_state, freeze_lora_a, inject_lora, load_adapter_state
from fedge.methods import Method
from fedge.models import LORA_TARGETS
from fedge.runconfig import RunSettings
from fedge.scenario import Scenario
from fedge.state import to_numpy, to_torch


def build_federated_model(scenario: Scenario, method: Method, settings: RunSettings) -> nn.Module:
    model = scenario.base_model()
    if method.payload == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    peft_model = inject_lora(
        model, LORA_TARGETS[scenario.architecture], rank=settings.lora_rank, alpha=settings.lora_alpha, seed=settings.seed
    )
    if method.payload == "lora-b":
        freeze_lora_a(peft_model)
    return peft_model


def exchanged_state(model: nn.Module, method: Method) -> OrderedDict[str, np.ndarray]:
    if method.payload == "full":
        return to_numpy(model.state_dict())
    state = adapter_state(model)  # type: ignore[arg-type]
    if method.payload == "lora-b":
        return OrderedDict((k, v) for k, v in state.items() if "lora_B" in k)
    return state


def load_exchanged_state(model: nn.Module, method: Method, state: dict[str, np.ndarray]) -> None:
    expected = exchanged_state(model, method)
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    if missing or extra:
        raise ValueError(f"state does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"tensor {name} has shape {value.shape}, model expects {expected[name].shape}")
    if method.payload == "full":
        model.load_state_dict(to_torch(state))
    else:
        load_adapter_state(model, state)  # type: ignore[arg-type]
