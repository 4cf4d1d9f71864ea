"""A node's own data on disk: what a real device trains and tests on instead of a scenario partition.

One `.npz` file per node (numpy's format, loaded without pickle): `x_train`,
`y_train`, `x_test`, `y_test`. The node names it in its node config
(`data-path`), and may name its device tier (`tier`); the scenario still
supplies the base model, so the samples must have the scenario's shape and
labels.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedge.scenario import ClientData
from fedge.tiers import DeviceTier, tier_named

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


class NodeDataError(ValueError):
    """The node's data file cannot serve this run (missing, malformed, or not the scenario's kind of sample)."""


def save_node_data(path: Path, data: ClientData) -> None:
    """Write a shard in the node-data format (for example, a scenario partition to try a real node with)."""
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, x_train=x_train.numpy(), y_train=y_train.numpy(), x_test=x_test.numpy(), y_test=y_test.numpy())


def node_tier(name: str) -> DeviceTier:
    """The tier a node's config names."""
    try:
        return tier_named(name)
    except ValueError as err:
        raise NodeDataError(f"node config {err}") from err


def load_node_data(path: Path, tier: DeviceTier, sample_shape: tuple[int, ...], num_classes: int) -> ClientData:
    """The shard in `path`, checked against the scenario's sample shape and label count."""
    stat = _stat(path)
    return _load(str(path), stat, tier, sample_shape, num_classes)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as err:
        raise NodeDataError(f"node data {path}: {err.strerror}") from err
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=4)
def _load(path: str, _stat: tuple[int, int], tier: DeviceTier, sample_shape: tuple[int, ...],
          num_classes: int) -> ClientData:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ARRAYS if k in npz.files}
    except (OSError, ValueError) as err:
        raise NodeDataError(f"node data {path} is not a readable .npz file: {err}") from err
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise NodeDataError(f"node data {path} lacks {', '.join(missing)}")
    splits = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[1:] != sample_shape:
            raise NodeDataError(f"node data {path}: x_{split} samples are {x.shape[1:]}, the scenario's are {sample_shape}")
        if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
            raise NodeDataError(f"node data {path}: y_{split} must be one label per sample of x_{split}, at least one")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise NodeDataError(f"node data {path}: y_{split} must hold integer labels in [0, {num_classes})")
        if not np.isfinite(x).all():
            raise NodeDataError(f"node data {path}: x_{split} has non-finite values")
        splits.append(TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)))
    return ClientData(train=splits[0], test=splits[1], tier=tier)
