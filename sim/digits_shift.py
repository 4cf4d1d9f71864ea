"""`digits-shift`: the embedded default scenario.

scikit-learn's handwritten digits (shipped with the package, no download),
upscaled to 32x32. A source split trains the base model once (seeded, cached
on disk); the rest is the target domain, split among clients by Dirichlet
label skew and seen by each client through its own camera shift (rotation,
blur, noise, contrast), so the base model loses accuracy there and adaptation
has something to win back.

Test sets: the target domain has only ~1,078 images, so a client's test split
(30% of its shard, ~324 images over all clients) would make one image 0.3
points of accuracy. Each test image is therefore seen `TEST_DRAWS` times
through the client's own camera, each take with its own noise and a little
jitter of angle, focus and exposure (`CameraShift.jittered`): the first take is
the one a single-draw test set had, so training data and partitions are
unchanged. Takes of one image are correlated, so this narrows the
noise of what is measured (how a model copes with the camera) more than it
adds independent images; comparisons rest on seeds and their intervals.

Fleets larger than `MAX_DISJOINT_CLIENTS` cannot split ~1,078 images into
shards of useful size. Their clients draw their shards with replacement
(`DRAWN_TRAIN` + `DRAWN_TEST` images, Dirichlet label skew): training images
from a train pool and test images from a disjoint test pool of the target
domain, so no test image is ever trained on, by any client, through any
camera. Such a fleet's test set is large by itself (1,000 clients: 10,000
samples, each pool image seen through some 30 cameras), so its clients take
each test image once: evaluating a thousand clients is costly enough. Up to
`MAX_DISJOINT_CLIENTS` the shards are the disjoint Dirichlet partition. Either
way a client's data is built when it is asked for, one client at a time.

What never changes between messages is cached in `$FEDGE_CACHE` beside the
base model: the upscaled digits, and each client's shard, so a node's message
neither imports scikit-learn nor SciPy nor redraws its camera shift.
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
from torch import nn
from torch.utils.data import TensorDataset

from fedge.progress import report
from fedge.scenario import ClientData
from fedge.sim.cache import cache_dir, cached_arrays
from fedge.sim.partition import dirichlet_draw, dirichlet_partition
from fedge.sim.shifts import CameraShift
from fedge.tiers import tier_for
from fedge.training import train_epochs

IMAGE_SIZE = 32
#: takes of each test image through its client's camera (a fleet of drawn shards: one)
TEST_DRAWS = 8
#: above this many clients, shards are drawn with replacement from disjoint train and test pools
MAX_DISJOINT_CLIENTS = 50
#: a drawn shard's images (about what each client holds at MAX_DISJOINT_CLIENTS disjoint clients)
DRAWN_TRAIN, DRAWN_TEST = 22, 10
#: version of the cached arrays (the upscaled digits, the client shards): change it when the code making them changes
DATA_VERSION = 2


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits upscaled to 32x32 in [0, 1], and their labels."""
    def make() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        raw = load_digits()
        return {"images": _upscale(raw.images / 16.0), "labels": raw.target.astype(np.int64)}

    arrays = cached_arrays(f"digits-{IMAGE_SIZE}px-v{DATA_VERSION}.npz", make)
    return arrays["images"], arrays["labels"]


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
        images, labels = digits()
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

    @cached_property
    def _pools(self) -> tuple[np.ndarray, np.ndarray]:
        """Disjoint train and test pools of the target domain (indices), for fleets that draw their shards."""
        _, _, _, y_t = self._split
        order = np.random.default_rng([self.seed, 5]).permutation(len(y_t))
        n_test = round(self.test_fraction * len(y_t))
        return np.sort(order[n_test:]), np.sort(order[:n_test])

    def drawn(self, num_partitions: int) -> bool:
        """Whether clients draw their shards with replacement (a fleet too large for disjoint shards)."""
        return num_partitions > MAX_DISJOINT_CLIENTS

    def test_takes(self, num_partitions: int) -> int:
        """How many times each client sees each of its test images."""
        return 1 if self.drawn(num_partitions) else TEST_DRAWS

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
        shift = self.client_shift(partition_id)

        def make() -> dict[str, np.ndarray]:
            _, _, x_t, y_t = self._split
            if self.drawn(num_partitions):
                rng = np.random.default_rng([self.seed, 4, partition_id])
                train_pool, test_pool = self._pools
                train = train_pool[dirichlet_draw(y_t[train_pool], DRAWN_TRAIN, self.alpha, rng)]
                test = test_pool[dirichlet_draw(y_t[test_pool], DRAWN_TEST, self.alpha, rng)]
                train_x, test_x = shift.apply(x_t[train], rng), shift.apply(x_t[test], rng)
            else:
                idx = dirichlet_partition(y_t, num_partitions, self.alpha, seed=self.seed)[partition_id]
                rng = np.random.default_rng([self.seed, 2, partition_id])
                images = shift.apply(x_t[idx], rng)
                order = rng.permutation(len(idx))
                n_test = max(2, round(self.test_fraction * len(idx)))
                train, test = idx[order[n_test:]], idx[order[:n_test]]
                train_x, test_x = images[order[n_test:]], images[order[:n_test]]
            takes, count = np.random.default_rng([self.seed, 3, partition_id]), self.test_takes(num_partitions)
            test_x = np.concatenate([test_x, *(shift.jittered(takes).apply(x_t[test], takes) for _ in range(count - 1))])
            return {"x_train": train_x, "y_train": y_t[train], "x_test": test_x, "y_test": np.tile(y_t[test], count)}

        spec = {"v": DATA_VERSION, "seed": self.seed, "alpha": self.alpha, "src": self.source_fraction,
                "test": self.test_fraction, "shift": self.shift_strength, "partitions": num_partitions}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        shard = cached_arrays(f"{self.name}-client-{key}-{partition_id}.npz", make)

        def ds(split: str) -> TensorDataset:
            return TensorDataset(torch.from_numpy(shard[f"x_{split}"][:, None]), torch.from_numpy(shard[f"y_{split}"]))

        return ClientData(train=ds("train"), test=ds("test"), tier=tier_for(partition_id), shift=shift.to_dict())

    def _shard_sizes(self, num_partitions: int) -> list[tuple[int, int]]:
        """(train, test images) of every client, without building any client's data."""
        if self.drawn(num_partitions):
            return [(DRAWN_TRAIN, DRAWN_TEST)] * num_partitions
        _, _, _, y_t = self._split
        sizes = [len(p) for p in dirichlet_partition(y_t, num_partitions, self.alpha, seed=self.seed)]
        return [(n - max(2, round(self.test_fraction * n)), max(2, round(self.test_fraction * n))) for n in sizes]

    def describe(self, num_partitions: int) -> dict[str, Any]:
        _, y_s, _, y_t = self._split
        sizes = self._shard_sizes(num_partitions)
        takes = self.test_takes(num_partitions)
        return {
            "name": self.name,
            "architecture": self.architecture,
            "seed": self.seed,
            "alpha": self.alpha,
            "image_size": IMAGE_SIZE,
            "source_samples": len(y_s),
            "target_samples": len(y_t),
            "num_partitions": num_partitions,
            "shards": "drawn with replacement from disjoint train/test pools" if self.drawn(num_partitions)
                      else "disjoint Dirichlet partition",
            "test_takes": takes,
            "test_images": sum(test for _, test in sizes),
            "test_samples": takes * sum(test for _, test in sizes),
            "clients": [
                {
                    "partition_id": p,
                    "samples": train + test,
                    "test_samples": takes * test,
                    "tier": tier_for(p).tier,
                    "shift": self.client_shift(p).to_dict(),
                }
                for p, (train, test) in enumerate(sizes)
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
            task = f"{self.name}: training the base model (first use; cached in {cache_dir()})"
            report(task, 0, self.base_epochs, "epochs")
            train_epochs(model, self.source_data(), epochs=self.base_epochs, lr=1e-3, batch_size=64,
                         device=torch.device("cpu"), seed=self.seed,
                         on_epoch=lambda done: report(task, done, self.base_epochs, "epochs"))
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)  # atomic: concurrent processes never see a half-written file
        return model
