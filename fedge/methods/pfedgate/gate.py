"""pFedGate's gated sparse model (Chen et al., ICML 2023).

A client-side gating layer looks at an input batch (pooled input ->
BatchNorm -> linear to one score per parameter block -> sigmoid, averaged over
the batch) and scores the blocks of the shared model. Under the client's
sparsity budget s a knapsack keeps the blocks worth most per element
(value = score, weight = block size, capacity = s * total elements); the first
block of every tensor is always kept. Kept blocks are scaled by their gate,
dropped blocks are zero, and a straight-through estimator lets the loss reach
the scores of dropped blocks too, so model and gate train jointly.

The gate factor is 2·score, so a score of 0.5 leaves a kept block unchanged:
the gate learns to amplify or damp blocks of a pretrained shared model from its
own function. Initial logits may fall along each tensor's blocks
(`ordered_prior`), so low-budget clients start from nested sub-models.

The knapsack is greedy by score per element. With a few near-equal blocks per
tensor and capacities far above any single block, greedy is within one block of
the optimum, cheap enough to run on every batch, and deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from fedge.methods.pfedgate.blocks import BlockLayout
from fedge.training import TrainStats, train_epochs

#: images larger than this (per side) are average-pooled to it before the gate sees them
GATE_POOL = 8


def knapsack(scores: np.ndarray, sizes: np.ndarray, capacity: float, forced: np.ndarray) -> np.ndarray:
    """Blocks to keep: the forced ones, then greedily by score per element while they fit in `capacity`.

    If the forced blocks alone exceed the capacity, only they are kept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    keep = np.asarray(forced, dtype=bool).copy()
    used = int(sizes[keep].sum())
    ratio = scores / np.maximum(sizes, 1)
    for i in np.argsort(-ratio, kind="stable"):
        if not keep[i] and used + sizes[i] <= capacity:
            keep[i] = True
            used += int(sizes[i])
    return keep


def ste_factors(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-block factors 2·score·mask; the mask's gradient passes straight through to the score."""
    hard = mask.to(scores.dtype)
    straight = hard + scores - scores.detach()
    return 2.0 * scores * straight


class BlockGate(nn.Module):
    """Input -> (avg-pool) -> flatten -> BatchNorm -> linear to one score per block -> sigmoid."""

    def __init__(self, sample_shape: tuple[int, ...], num_blocks: int, prior: np.ndarray | None = None) -> None:
        """`prior`: initial score logits per block (default 0, i.e. score 0.5 and factor 1 everywhere)."""
        super().__init__()
        self.pool = len(sample_shape) == 3 and max(sample_shape[1:]) > GATE_POOL
        features = int(np.prod(sample_shape)) if not self.pool else sample_shape[0] * GATE_POOL * GATE_POOL
        self.norm = nn.BatchNorm1d(features)
        self.linear = nn.Linear(features, num_blocks)
        nn.init.normal_(self.linear.weight, std=0.01)
        with torch.no_grad():
            self.linear.bias.copy_(torch.zeros(num_blocks) if prior is None else torch.as_tensor(prior, dtype=torch.float32))

    def sample_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample block scores, shape (batch, blocks)."""
        if self.pool:
            x = F.adaptive_avg_pool2d(x, GATE_POOL)
        return torch.sigmoid(self.linear(self.norm(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block scores for the batch: the per-sample scores averaged."""
        return self.sample_scores(x).mean(0)


def ordered_prior(layout: BlockLayout, strength: float) -> np.ndarray:
    """Initial logits that fall with a block's position in its tensor, from 0 at the first block to -strength.

    Until gates learn otherwise, low-budget clients then keep the leading blocks of each tensor, so their
    sparse models are nested inside each other's (as in ordered dropout) and every kept block is trained
    by every client that can afford it, instead of each client training a scattered subset alone.
    """
    last: dict[str, int] = {}
    for b in layout.blocks:
        last[b.tensor] = max(last.get(b.tensor, 0), b.index)
    return np.array([-strength * b.index / max(last[b.tensor], 1) for b in layout.blocks], dtype=np.float32)


def shared_parameter_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Map exchanged-state keys to the model's parameter names (peft inserts the adapter name, `.default`)."""
    by_key: dict[str, str] = {}
    for name, _ in model.named_parameters():
        by_key.setdefault(name, name)
        by_key.setdefault(name.replace(".default.", "."), name)
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"exchanged tensors without a model parameter: {missing[:3]}")
    return {k: by_key[k] for k in keys}


class GatedModel(nn.Module):
    """The shared model seen through a client's gate under its sparsity budget."""

    def __init__(self, model: nn.Module, gate: BlockGate, layout: BlockLayout, budget: float) -> None:
        super().__init__()
        self.model = model
        self.gate = gate
        self.layout = layout
        self.budget = budget
        names = [name for name, _ in layout.shapes]
        self.param_names = shared_parameter_names(model, names)
        params = dict(model.named_parameters())
        self._block_ids = {name: torch.tensor(layout.blocks_of(name)) for name in names}
        self._block_sizes = {name: torch.tensor(layout.sizes[layout.blocks_of(name)]) for name in names}
        self._shared = {name: params[self.param_names[name]] for name in names}
        self._sizes = layout.sizes
        self._forced = layout.first
        self._capacity = budget * layout.total
        #: set by `freeze`: the personal model's fixed factors (gate scores over the client's own data)
        self.fixed: torch.Tensor | None = None

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        keep = knapsack(scores.detach().cpu().numpy(), self._sizes, self._capacity, self._forced)
        return torch.from_numpy(keep).to(scores.device)

    def gated_parameters(self, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self._shared.items():
            per_element = torch.repeat_interleave(factors[self._block_ids[name].to(factors.device)],
                                                  self._block_sizes[name].to(factors.device))
            out[self.param_names[name]] = param * per_element.reshape(param.shape)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            factors = self.fixed.to(x.device)
        else:
            scores = self.gate(x)
            factors = ste_factors(scores, self.select(scores))
        return functional_call(self.model, self.gated_parameters(factors), (x,))

    @torch.no_grad()
    def data_scores(self, data: TensorDataset, device: torch.device, batch_size: int = 256) -> torch.Tensor:
        """The gate's scores averaged over a data set (eval-mode normalisation)."""
        self.gate.to(device).eval()
        total, seen = None, 0
        for x, _ in DataLoader(data, batch_size=batch_size):
            s = self.gate.sample_scores(x.to(device)).sum(0)
            total = s if total is None else total + s
            seen += len(x)
        assert total is not None, "empty data set"
        return total / seen

    def freeze(self, data: TensorDataset, device: torch.device) -> np.ndarray:
        """Fix the personal model to the gate's view of the client's own data; returns the kept-block mask."""
        scores = self.data_scores(data, device)
        keep = self.select(scores)
        self.fixed = (2.0 * scores * keep.to(scores.dtype)).detach()
        return keep.cpu().numpy()

    def unfreeze(self) -> None:
        self.fixed = None


def train_gated(gated: GatedModel, data: TensorDataset, *, epochs: int, lr: float, gate_lr: float, batch_size: int,
                device: torch.device, seed: int, train_shared: bool = True) -> TrainStats:
    """Adam on the shared parameters (lr) and the gate (gate_lr) jointly; gate only when `train_shared` is off."""
    gated.unfreeze()
    shared = [p for p in gated._shared.values() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": list(gated.gate.parameters()), "lr": gate_lr}]
    if train_shared:
        groups.append({"params": shared, "lr": lr})
    else:  # no gradients for what stays fixed
        for p in shared:
            p.requires_grad_(False)
    try:
        return train_epochs(gated, data, epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed,
                            param_groups=groups, drop_last=len(data) > batch_size)  # BatchNorm needs two samples
    finally:
        for p in shared:
            p.requires_grad_(True)


def gate_state(gate: BlockGate) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in gate.state_dict().items()}


def load_gate_state(gate: BlockGate, state: Mapping[str, np.ndarray]) -> None:
    gate.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
