"""The model a method federates, the part of it that travels, and the one merge into a plain model.

Server and clients build it the same way (base model from the scenario, LoRA
seeded identically on the scenario's targets), so only the exchanged state ever
has to cross the wire.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedge.scenario import Scenario
from fedge.state import to_numpy, to_torch

#: what a method trains and exchanges: the whole model, LoRA A and B, or LoRA B only (A frozen)
PAYLOADS = ("full", "lora", "lora-b")
#: how peft names an adapted layer's tensors in the exchanged state: PREFIX + layer + ".lora_A.weight"
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def build_federated_model(scenario: Scenario, payload: str, *, rank: int, alpha: int, seed: int,
                          targets: Sequence[str] = ()) -> nn.Module:
    """The scenario's base model, with LoRA on its own targets (or `targets`) unless the whole model is federated.

    A head the scenario adds to a pretrained model (`modules_to_save`) is trained and exchanged whole.
    """
    if payload not in PAYLOADS:
        raise ValueError(f"payload must be one of {PAYLOADS}, not {payload!r}")
    model = scenario.base_model()
    if payload == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from fedge.adapters import freeze_lora_a, inject_lora

    peft_model = inject_lora(model, list(targets or scenario.lora_targets), rank=rank, alpha=alpha, seed=seed,
                             modules_to_save=list(getattr(scenario, "modules_to_save", ())))
    if payload == "lora-b":
        freeze_lora_a(peft_model)
    return peft_model


def exchanged_state(model: nn.Module, payload: str) -> OrderedDict[str, np.ndarray]:
    if payload == "full":
        return to_numpy(model.state_dict())
    from fedge.adapters import adapter_state

    state = adapter_state(model)  # type: ignore[arg-type]
    if payload == "lora-b":  # all but A (B, and any head trained whole)
        return OrderedDict((k, v) for k, v in state.items() if "lora_A" not in k)
    return state


def load_exchanged_state(model: nn.Module, payload: str, state: Mapping[str, np.ndarray]) -> None:
    expected = exchanged_state(model, payload)
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    if missing or extra:
        raise ValueError(f"state does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"tensor {name} has shape {value.shape}, model expects {expected[name].shape}")
    if payload == "full":
        model.load_state_dict(to_torch(dict(state)))
    else:
        from fedge.adapters import load_adapter_state

        load_adapter_state(model, dict(state))  # type: ignore[arg-type]


def merged_copy(model: nn.Module) -> nn.Module:
    """An fp32 eval copy on the CPU with any peft LoRA adapters folded into the base weights; `model` is untouched.

    What export and serving use: a plain model of the base architecture.
    """
    clone = copy.deepcopy(model)
    merge = getattr(clone, "merge_and_unload", None)  # peft.PeftModel, without importing peft for plain models
    if callable(merge):
        clone = merge()
    return clone.float().eval().cpu()


def fold_lora(model: nn.Module, state: Mapping[str, np.ndarray], *, rank: int, alpha: int) -> nn.Module | None:
    """`model` (the plain base) with exchanged LoRA state folded into its weights in plain torch, W += (alpha/rank) B A;
    None where that cannot stand for the peft model.

    What a node that only evaluates runs instead of building the peft model, so it never imports peft
    (nor, through it, transformers). It matches peft's merge (`merged_copy`) to float rounding for
    Linear and ungrouped Conv layers; a state with anything else (another layer type, LoRA B alone,
    another rank) gets None and the caller builds the peft model.
    """
    pairs: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = []
    for key, a in state.items():
        if key.endswith(LORA_B) and key[: -len(LORA_B)] + LORA_A in state:
            continue
        if not (key.startswith(PEFT_PREFIX) and key.endswith(LORA_A)) or key[: -len(LORA_A)] + LORA_B not in state:
            return None
        try:
            layer = model.get_submodule(key[len(PEFT_PREFIX): -len(LORA_A)])
        except AttributeError:
            return None
        foldable = type(layer) is nn.Linear or (type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and layer.groups == 1)
        weight = layer.weight if foldable else None
        b = state[key[: -len(LORA_A)] + LORA_B]
        if not isinstance(weight, torch.Tensor) or a.shape[0] != rank or b.shape[:2] != (weight.shape[0], rank):
            return None
        pairs.append((weight, a, b))
    scale = alpha / rank
    with torch.no_grad():
        for weight, a, b in pairs:
            delta = torch.from_numpy(b.reshape(b.shape[0], rank)) @ torch.from_numpy(a.reshape(rank, -1))
            weight += scale * delta.reshape(weight.shape).to(weight.dtype)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
