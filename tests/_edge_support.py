"""Shared pieces of the edge tests: small models, real data, agents on a registry, waiting with a deadline.

The `registry` (a registry serving on loopback) and `device` (a started agent on it) fixtures are in conftest.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedge.edge.artifacts import BundleFile
from fedge.scenario import load_scenario
from fedge.sim.digits_shift import DigitsCNN

if TYPE_CHECKING:
    from fedge.edge.agent import EdgeAgent
    from fedge.edge.registry import Registry

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


def _cached(name: str, build: Callable[[], bytes]) -> bytes:
    """Bytes derived from the trained base model, cached on disk by its weights and torch version (export is slow).

    The export tests export afresh; the deployment tests only need some valid export of the base model.
    """
    import hashlib
    import os

    from fedge.sim.digits_shift import cache_dir

    digest = hashlib.sha256(torch.__version__.encode() + name.encode())
    for key, tensor in sorted(trained_model().state_dict().items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    path = cache_dir() / f"edge-test-{name}-{digest.hexdigest()[:16]}.bin"
    if path.exists():
        return path.read_bytes()
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


@lru_cache(maxsize=1)
def base_onnx() -> bytes:
    """The trained base model's fp32 export."""
    from fedge.edge.export import to_onnx

    return _cached("base-fp32", lambda: to_onnx(trained_model(), target_data().tensors[0][:2]))


def calibration_inputs() -> np.ndarray:
    """Inputs for INT8 calibration: the partitions' training splits (never the test data the devices serve)."""
    sc = load_scenario("digits-shift")
    return torch.cat([sc.client_data(p, 4).train.tensors[0] for p in range(4)])[:512].numpy()


@lru_cache(maxsize=4)
def int8_of(kind: str = "base") -> bytes:
    """The INT8 (QDQ, 7-bit weights) format of `base_onnx()` or of `onnx_variant(kind)`."""
    from fedge.edge.export import quantize_int8_qdq

    fp32 = base_onnx() if kind == "base" else onnx_variant(kind)
    return _cached(f"{kind}-int8", lambda: quantize_int8_qdq(fp32, calibration_inputs()))


@lru_cache(maxsize=2)
def fp16_of(fp32: bytes) -> bytes:
    from fedge.edge.export import to_fp16

    return to_fp16(fp32)


def damaged_int8(int8: bytes, layer: str = "conv2", factor: float = 6.0) -> bytes:
    """An INT8 format with one layer's weights scaled (its weight scales times `factor`): finite, plausible, and in
    top-1 disagreement with fp32 on many inputs. Signed, it is a valid artifact; only a comparison catches it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(int8)
    inits = {t.name: t for t in model.graph.initializer}
    scales = [n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and layer in n.input[0]]
    assert len(scales) == 1, scales
    scale = inits[scales[0]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
    return model.SerializeToString()


def reference_of(fp32: bytes, n: int = 64) -> bytes:
    """The reference set a version ships: held-out inputs (another partition's, not a device's) and fp32's logits."""
    from fedge.edge.agreement import reference_set
    from fedge.edge.runtime import OnnxRuntimeModel

    return reference_set(OnnxRuntimeModel(fp32).predict, target_data(4, 3).tensors[0][:n].numpy())


def bundle(**formats: bytes) -> dict[str, BundleFile]:
    """A version's formats: fp32=, int8=, fp16= (ONNX bytes) and reference= (a reference set)."""
    return {name: BundleFile(data, "reference", "") if name == "reference" else BundleFile(data, "onnx", name)
            for name, data in formats.items()}


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


def to_npz(path, data: TensorDataset, labels: bool = True) -> None:  # type: ignore[no-untyped-def]
    """A device's local data file (`labels=False`: inputs only, as on a device that never sees labels)."""
    x, y = data.tensors[0].numpy().astype(np.float32), data.tensors[1].numpy().astype(np.int64)
    if labels:
        np.savez(path, x=x, y=y)
    else:
        np.savez(path, x=x)


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def make_agent(tmp_path: Path, address: str, reg: Registry, name: str = "cam-0", labels: bool | None = True,
               **options: object) -> EdgeAgent:
    """An agent on its own thread set (`labels`: labelled local data, unlabelled, or None: no data at all)."""
    from fedge.edge.agent import AgentConfig, EdgeAgent

    data_path = None
    if labels is not None:
        data_path = tmp_path / f"{name}.npz"
        to_npz(data_path, target_data(), labels=labels)
    public = tmp_path / "registry.pub.pem"
    public.write_bytes(reg.public_key_pem)
    config = AgentConfig(registry=address, device_id=name, workdir=tmp_path / name, public_key=public, data=data_path,
                         report_interval_s=0.2, **options)  # type: ignore[arg-type]
    agent = EdgeAgent(config)
    agent.start()
    return agent


def deploy(reg: Registry, agent: EdgeAgent, formats: dict[str, BundleFile]) -> str:
    """Publish a version and wait until `agent` serves it; the format it chose."""
    version = reg.publish(formats)
    wait_until(lambda: agent.serving_version == version, what=f"v{version} to serve")
    return served_format(agent)


def serve_first(reg: Registry, agent: EdgeAgent, model: bytes) -> None:
    """Publish `model` (fp32) as v1 and wait until `agent` serves it."""
    assert deploy(reg, agent, bundle(fp32=model)) == "fp32" and agent.serving_version == 1


def served_format(agent: EdgeAgent) -> str:
    """Which format of its version the device serves ("" before it serves any)."""
    served = agent.serving.served
    return served.format if served else ""


def events(reg: Registry) -> list[dict]:
    """Every deployment event the registry's devices reported, in order."""
    path = reg.workdir / "telemetry.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for line in lines for e in json.loads(line).get("events", [])]


def lora_model(scale: float = 0.0, seed: int = 1) -> torch.nn.Module:
    """The trained base with LoRA (rank 8) on the scenario's targets; B drawn at `scale` (0: peft's own start, whose
    outputs are the base's), as a federation's adapter would be."""
    from fedge.adapters import inject_lora

    model = inject_lora(trained_model(), list(load_scenario("digits-shift").lora_targets), rank=8, alpha=16, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@lru_cache(maxsize=1)
def unmerged_base() -> BundleFile:
    """The fp32 unmerged format of `lora_model()` (its adapter as overridable initializers), checked as export checks."""
    from fedge.edge.adapters.delta import adapter_tensors
    from fedge.edge.adapters.export import checked_unmerged, describe, lora_layers, to_onnx_unmerged

    model, x = lora_model(), target_data().tensors[0]
    data = _cached("unmerged-r8", lambda: to_onnx_unmerged(model, x[:2])[0])
    return checked_unmerged(data, describe(lora_layers(model, x[:1]), adapter_tensors(data)), model, x)
