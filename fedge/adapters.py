"""LoRA adapters injected with peft, and their state as named numpy arrays."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fedge.state import to_numpy, to_torch


def inject_lora(model: nn.Module, targets: list[str], *, rank: int = 16, alpha: int = 32, seed: int = 0) -> PeftModel:
    """Wrap `model` with LoRA on `targets` (conv and linear layers).

    The LoRA A matrices are drawn from a seeded generator so that the server and
    every client start from the same adapter without shipping it.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def adapter_state(model: PeftModel) -> OrderedDict[str, np.ndarray]:
    return to_numpy(get_peft_model_state_dict(model))


def load_adapter_state(model: PeftModel, state: dict[str, np.ndarray]) -> None:
    result = set_peft_model_state_dict(model, to_torch(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has unknown tensors: {unexpected[:5]}")


def freeze_lora_a(model: PeftModel) -> None:
    """FFA-LoRA: A stays at its shared seeded init, so averaging B is exact (mean(B)A = mean(BA))."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
