"""Local training and evaluation loops shared by clients, the base-model trainer and the edge, and where they run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedge.errors import UserError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else the CPU; an explicit CUDA device without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r}: CUDA is not available on this machine", "use --device cpu (or auto)")
    return device


@dataclass
class TrainStats:
    num_examples: int
    loss: float
    steps: int


@dataclass
class EvalStats:
    num_examples: int
    correct: int
    loss: float
    mean_entropy: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_examples if self.num_examples else 0.0


def train_epochs(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    params: Iterable[nn.Parameter] | None = None,
    weight_decay: float = 0.0,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    drop_last: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainStats:
    """Adam on the given parameters (default: those with requires_grad), seeded shuffling.

    `param_groups` (Adam's own groups, each with its lr) replaces `params` where parts
    of a model learn at different rates; `drop_last` keeps BatchNorm away from batches of one;
    `on_epoch(epochs done)` follows long training (a progress bar).
    """
    if param_groups is None:
        trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        param_groups = [{"params": trainable}]
    optimizer = torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last)
    loss_fn = nn.CrossEntropyLoss()
    model.to(device).train()
    total_loss, total_seen, steps = 0.0, 0, 0
    for epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            total_seen += len(y)
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return TrainStats(num_examples=len(data), loss=total_loss / max(total_seen, 1), steps=steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, *, device: torch.device, batch_size: int = 256) -> EvalStats:
    model.to(device).eval()
    loader = DataLoader(data, batch_size=batch_size)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct, seen, loss_sum, entropy_sum = 0, 0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(loss_fn(logits, y))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        logp = torch.log_softmax(logits, dim=1)
        entropy_sum += float(-(logp.exp() * logp).sum())
    return EvalStats(num_examples=seen, correct=correct, loss=loss_sum / max(seen, 1), mean_entropy=entropy_sum / max(seen, 1))
