"""A plug-in from outside the package: one codec, one method that uploads with it, one scenario with its own model.

Loaded by naming it in FEDGE_PLUGINS (tests/test_plugins.py), in the test process and in Flower's simulation
workers alike.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.codecs import Encoded, TensorSpec, register_codec, specs_of
from fedge.codecs.base import CodecError, Section, assemble, flat_f32
from fedge.methods import register_method
from fedge.methods.compressed import compressed_method
from fedge.scenario import ClientData, register_scenario
from fedge.settings import ConfigSection
from fedge.tiers import tier_for
from fedge.training import train_epochs


# ---- a codec: the update as float16 ------------------------------------------------------------------
@register_codec
class HalfCodec:
    name = "toy-half"
    version = 1

    def params(self) -> dict[str, str]:
        return {}

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded:
        payload = b"".join(flat_f32(a).astype("<f2").tobytes() for a in update.values())
        return Encoded(payload, specs_of(update), [Section("values", len(payload))])

    def decode(self, payload: bytes, specs: list[TensorSpec]) -> OrderedDict[str, np.ndarray]:
        sizes = [s.size for s in specs]
        if len(payload) != 2 * sum(sizes):
            raise CodecError(f"toy-half payload has {len(payload)} bytes, the specs need {2 * sum(sizes)}")
        flat = np.frombuffer(payload, dtype="<f2").astype(np.float32)
        bounds = np.cumsum([0, *sizes])
        return assemble(specs, [flat[a:b] for a, b in itertools.pairwise(bounds)])


# ---- a method that uploads with it -----------------------------------------------------------------------
@dataclass
class HalfOptions(ConfigSection):
    error_feedback: bool = False

    def codec_params(self) -> dict[str, Any]:
        return {}


register_method(compressed_method("toy-half", "toy-half", HalfOptions, "LoRA updates sent as float16 (a plug-in)."))


# ---- a scenario with its own architecture and LoRA targets ----------------------------------------------------
class BlobNet(nn.Module):
    def __init__(self, features: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


class ToyBlobs:
    """Gaussian blobs; the target domain is the source shifted and rotated, per client a little differently."""

    name = "toy-blobs"
    architecture = "blob-net"
    task = "classification"
    num_classes = 4
    sample_shape = (8,)
    lora_targets = ("hidden", "head")

    def __init__(self, seed: int = 0, alpha: float = 0.5) -> None:
        self.seed = seed
        self.alpha = alpha

    def _samples(self, rng: np.random.Generator, n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        centers = np.random.default_rng(self.seed).normal(0, 2.0, size=(self.num_classes, 8))
        y = rng.integers(0, self.num_classes, n)
        x = centers[y] + rng.normal(0, 1.0, size=(n, 8)) + shift
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)

    @cached_property
    def _base(self) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = BlobNet()
            x, y = self._samples(np.random.default_rng([self.seed, 0]), 512, 0.0)
            train_epochs(model, TensorDataset(x, y), epochs=10, lr=1e-2, batch_size=32, device=torch.device("cpu"),
                         seed=self.seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    def base_model(self) -> nn.Module:
        model = BlobNet()
        model.load_state_dict(self._base)
        return model

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData:
        rng = np.random.default_rng([self.seed, 1, partition_id])
        train = TensorDataset(*self._samples(rng, 96, 1.5))
        test = TensorDataset(*self._samples(rng, 64, 1.5))
        return ClientData(train=train, test=test, tier=tier_for(partition_id))

    def describe(self, num_partitions: int) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, "clients": [{"partition_id": p}
                                                                                  for p in range(num_partitions)]}


register_scenario("toy-blobs", ToyBlobs)
