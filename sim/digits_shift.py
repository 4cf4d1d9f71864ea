"""`digits-shift`: the embedded default scenario.

scikit-learn's handwritten digits (shipped with the package, no download),
upscaled to 32x32. A source split trains the base model once (seeded, cached
on disk); the rest is the target domain, split among clients by Dirichlet
label skew and seen by each client through its own camera shift (rotation,
blur, noise, contrast), so the base model loses accuracy there and adaptation
has something to win back.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from fedge.scenario import ClientData
from fedge.sim.cache import cache_dir
from fedge.sim.partition import dirichlet_partition
from fedge.sim.shifts import CameraShift
from fedge.tiers import tier_for
from fedge.training import train_epochs

IMAGE_SIZE = 32


def _upscale(images: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(images[:, None].astype(np.float32))
    return F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()


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


class DigitsShift:
    name = "digits-shift"
    architecture = "digits-cnn"
    task = "classification"
    num_classes = 10
    sample_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    #: LoRA on every conv and linear layer
    lora_targets = ("conv1", "conv2", "conv3", "fc1", "fc2")

    def __init__(
        self,
        seed: int = 0,
        alpha: float = 0.5,
        source_fraction: float = 0.4,
        test_fraction: float = 0.3,
        shift_strength: float = 1.0,
        base_epochs: int = 15,
    ) -> None:
        self.seed = seed
        self.alpha = alpha
        self.source_fraction = source_fraction
        self.test_fraction = test_fraction
        self.shift_strength = shift_strength
        self.base_epochs = base_epochs

    # ---- data ------------------------------------------------------------------
    @cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        digits = load_digits()
        images = _upscale(digits.images / 16.0)
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(labels))
        n_source = int(self.source_fraction * len(labels))
        src, tgt = order[:n_source], order[n_source:]
        return images[src], labels[src], images[tgt], labels[tgt]

    def source_data(self) -> TensorDataset:
        x, y, _, _ = self._split
        return TensorDataset(torch.from_numpy(x[:, None]), torch.from_numpy(y))

    def client_shift(self, partition_id: int) -> CameraShift:
        return CameraShift.draw(np.random.default_rng([self.seed, 1, partition_id]), self.shift_strength)

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
        _, _, x_t, y_t = self._split
        parts = dirichlet_partition(y_t, num_partitions, self.alpha, seed=self.seed)
        idx = parts[partition_id]
        rng = np.random.default_rng([self.seed, 2, partition_id])
        shift = self.client_shift(partition_id)
        images = shift.apply(x_t[idx], rng)
        labels = y_t[idx]
        order = rng.permutation(len(idx))
        n_test = max(2, round(self.test_fraction * len(idx)))
        test, train = order[:n_test], order[n_test:]

        def ds(sel: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy(images[sel][:, None]), torch.from_numpy(labels[sel]))

        return ClientData(train=ds(train), test=ds(test), tier=tier_for(partition_id), shift=shift.to_dict())

    def describe(self, num_partitions: int) -> dict[str, Any]:
        _, y_s, _, y_t = self._split
        return {
            "name": self.name,
            "architecture": self.architecture,
            "seed": self.seed,
            "alpha": self.alpha,
            "image_size": IMAGE_SIZE,
            "source_samples": len(y_s),
            "target_samples": len(y_t),
            "num_partitions": num_partitions,
            "clients": [
                {
                    "partition_id": p,
                    "samples": len(part),
                    "tier": tier_for(p).tier,
                    "shift": self.client_shift(p).to_dict(),
                }
                for p, part in enumerate(dirichlet_partition(y_t, num_partitions, self.alpha, seed=self.seed))
            ],
        }

    # ---- base model ------------------------------------------------------------
    def _cache_key(self) -> str:
        spec = {"v": 1, "arch": self.architecture, "seed": self.seed, "src": self.source_fraction, "epochs": self.base_epochs}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def base_model(self) -> nn.Module:
        """Train on the source domain once; later calls (any process) load the cached weights."""
        path = cache_dir() / f"{self.name}-base-{self._cache_key()}.safetensors"
        model = DigitsCNN(self.num_classes)
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            return model
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # bitwise-reproducible weights across processes on one machine
        try:
            torch.manual_seed(self.seed)
            model = DigitsCNN(self.num_classes)
            train_epochs(model, self.source_data(), epochs=self.base_epochs, lr=1e-3, batch_size=64,
                         device=torch.device("cpu"), seed=self.seed)
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)  # atomic: concurrent processes never see a half-written file
        return model
