"""Named-tensor state as numpy, the common currency between roles and Flower records."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_numpy(state: dict[str, torch.Tensor]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.detach().cpu().numpy().astype(np.float32, copy=True)) for k, v in state.items())


def to_torch(state: dict[str, np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in state.items())


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def from_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, arr.numpy()) for k, arr in record.items())


def subtract(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, a[k] - b[k]) for k in a)


def add(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, a[k] + b[k]) for k in a)


def num_elements(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.size for v in state.values()))


def digest(state: dict[str, np.ndarray]) -> str:
    """sha256 of the names and float32 bytes, in order: two sides that rebuilt a state check they hold the same one."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    return h.hexdigest()
