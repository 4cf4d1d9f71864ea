"""Shared pieces of the edge tests: small models, real data, waiting with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedge.scenario import load_scenario
from fedge.sim.digits_shift import DigitsCNN

T = TypeVar("T")


def seeded_model(seed: int = 0) -> torch.nn.Module:
    """An untrained DigitsCNN: as good as a trained one for export and deployment mechanics, and instant."""
    torch.manual_seed(seed)
    return DigitsCNN().eval()


def trained_model() -> torch.nn.Module:
    """The scenario's base model (trained once, cached on disk): an untrained net predicts one class, a collapse."""
    return load_scenario("digits-shift").base_model().eval()


def shifted(model: torch.nn.Module, scale: float = 0.01, seed: int = 1) -> torch.nn.Module:
    """A new version of `model`: same graph, different weights (what an adaptation round produces)."""
    import copy

    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return new


def collapsed(model: torch.nn.Module, cls: int = 3) -> torch.nn.Module:
    """A model that answers `cls` whatever the input: finite, plausible, wrong (a canary must catch it)."""
    import copy

    new = copy.deepcopy(model)
    with torch.no_grad():
        new.fc2.weight.zero_()
        new.fc2.bias.zero_()
        new.fc2.bias[cls] = 5.0
    return new


@lru_cache(maxsize=8)
def target_data(n_partitions: int = 4, partition: int = 0) -> TensorDataset:
    return load_scenario("digits-shift").client_data(partition, n_partitions).test


@lru_cache(maxsize=1)
def base_onnx() -> bytes:
    """The trained base model's export, cached on disk by weights and torch version (export is the slow step).

    The export tests export afresh; the deployment tests only need some valid export of the base model.
    """
    import hashlib
    import os

    from fedge.edge.export import to_onnx
    from fedge.sim.digits_shift import cache_dir

    model = trained_model()
    digest = hashlib.sha256(torch.__version__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    path = cache_dir() / f"edge-test-base-{digest.hexdigest()[:16]}.onnx"
    if path.exists():
        return path.read_bytes()
    data = to_onnx(model, target_data().tensors[0][:2])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def onnx_variant(kind: str) -> bytes:
    """A new version with the base graph and edited weights, as an adaptation round or a bad push would make."""
    from fedge.edge.weights import apply_initializers, initializers

    weights = initializers(base_onnx())
    rng = np.random.default_rng(1)
    if kind == "shifted":  # same graph, slightly different weights: a normal update
        changes = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in weights.items() if v.dtype == np.float32}
    elif kind == "collapsed":  # finite and plausible, but answers class 3 for everything
        bias = np.zeros_like(weights["fc2.bias"])
        bias[3] = 5.0
        changes = {"fc2.weight": np.zeros_like(weights["fc2.weight"]), "fc2.bias": bias}
    else:
        raise ValueError(kind)
    return apply_initializers(base_onnx(), changes)


def to_npz(path, data: TensorDataset) -> None:  # type: ignore[no-untyped-def]
    x, y = data.tensors[0].numpy().astype(np.float32), data.tensors[1].numpy().astype(np.int64)
    np.savez(path, x=x, y=y)


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
