"""LoRA adapters injected with peft, and their state as named numpy arrays."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fedge.state import to_numpy, to_torch


def inject_lora(model: nn.Module, targets: list[str], *, rank: int = 16, alpha: int = 32, seed: int = 0,
                modules_to_save: list[str] | None = None) -> PeftModel:
    """Wrap `model` with LoRA on `targets` (conv and linear layers); `modules_to_save` train whole beside it.

    The LoRA A matrices are drawn from a seeded generator so that the server and
    every client start from the same adapter without shipping it. A base loaded
    in 4-bit (QLoRA) is first prepared for k-bit training as peft prescribes.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                        modules_to_save=modules_to_save or None)
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # peft names the targets it did not find
            raise ValueError(f"LoRA targets {targets} do not fit the model: {err}") from err


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


def save_adapter(model: PeftModel, directory: str | Path, base_model_name_or_path: str | None) -> Path:
    """The adapter in peft's own format (adapter_config.json + adapter_model.safetensors), naming its base so that
    `PeftModel.from_pretrained(base, directory)` (or peft's Auto classes, for a Hugging Face base) rebuilds it."""
    directory = Path(directory)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_name_or_path
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory
