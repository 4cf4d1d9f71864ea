"""Model architectures known by name, so a client, a server and an exporter build the same one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A ~1.1M-parameter CNN for 1x32x32 images.

    Most parameters sit in `fc1`, as in the vision models fleets adapt, so that
    adapters and compression have something real to bite on.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(4 * width * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = self.pool(self.act(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        return self.fc2(x)


#: Modules LoRA is injected into, per architecture (conv and linear layers).
LORA_TARGETS: dict[str, list[str]] = {
    "digits-cnn": ["conv1", "conv2", "conv3", "fc1", "fc2"],
}

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": DigitsCNN,
}


def build_model(name: str) -> nn.Module:
    """Build an untrained model by architecture name."""
    try:
        return _BUILDERS[name]()
    except KeyError as err:
        raise ValueError(f"unknown model architecture {name!r}; known: {sorted(_BUILDERS)}") from err


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
