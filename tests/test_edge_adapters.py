"""Adapter-only updates: an unmerged base exported once, each new version a coded adapter change applied on the
device (ONNX Runtime's LoRA adapter API, or merged on the device), verified, canaried, refused when it does not fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from _edge_support import (
    base_onnx,
    deploy,
    events,
    lora_model,
    make_agent,
    served_format,
    target_data,
    unmerged_base,
    wait_until,
)

from fedge.adapters import adapter_state, load_adapter_state
from fedge.codecs import build_codec
from fedge.edge.adapters.delta import (
    ADAPTER_META,
    FP32_ADAPTER,
    FP32_UNMERGED,
    adapter_tensors,
    adapter_update,
    apply_adapter_update,
    with_adapter,
)
from fedge.edge.adapters.serving import AdapterModel
from fedge.edge.artifacts import BundleFile
from fedge.envelope import EnvelopeError
from fedge.federated_model import merged_copy

CODEC = build_codec("fedzip", z=1.0, clusters=64)


def merged_logits(adapter: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """PyTorch's logits with `adapter` merged into the base weights: what every format of its version must give."""
    model = lora_model()
    load_adapter_state(model, {k: np.array(v) for k, v in adapter.items()})
    with torch.no_grad():
        return merged_copy(model)(torch.from_numpy(x)).numpy()


def test_the_unmerged_graph_is_the_merged_model_and_takes_its_adapter_at_run_time() -> None:
    base = unmerged_base()
    adapter = adapter_tensors(base.data)
    assert list(adapter) == list(adapter_state(lora_model()))  # peft's own names: an update carries the federation's
    forms = base.metadata[ADAPTER_META]["forms"]
    assert {forms[layer] for layer in ("conv1", "conv2", "conv3")} == {"weight"}  # a branch per pixel costs more
    assert {forms[layer] for layer in ("fc1", "fc2")} == {"branch"}  # B·A per run costs more than x·A·B
    assert base.metadata[ADAPTER_META]["max_abs_diff_vs_merged"] <= 1e-4

    new = adapter_state(lora_model(scale=0.02))
    update, target = adapter_update(base.data, 1, new, CODEC)
    assert update.metadata["target_sha256"] != update.metadata["base_sha256"]
    assert len(update.data) < update.metadata["dense_bytes"] < len(base.data)
    assert apply_adapter_update(base.data, update.data) == target  # what a device rebuilds, byte for byte
    applied = adapter_tensors(target)  # the base's adapter plus the decoded change (a lossy codec defines it)
    x = target_data().tensors[0][:64].numpy()
    expected = merged_logits(applied, x)
    unmerged = AdapterModel(base.data, "unmerged").with_adapter(applied)  # the base's session, a new adapter
    merged = AdapterModel(base.data, "merged").with_adapter(applied)  # folded into the base weights on the device
    assert np.abs(unmerged.predict(x) - expected).max() <= 1e-4
    assert np.abs(merged.predict(x) - expected).max() <= 1e-4
    assert np.abs(AdapterModel(target, "unmerged").predict(x) - expected).max() <= 1e-4  # the graph's own defaults
    with pytest.raises(EnvelopeError, match="spec-mismatch"):  # a change for other tensors does not apply
        apply_adapter_update(base.data, update.data.replace(b"lora_A", b"lora_Z", 1))


def _v2(base: BundleFile, scale: float = 0.02) -> tuple[BundleFile, bytes]:
    return adapter_update(base.data, 1, adapter_state(lora_model(scale=scale)), CODEC)


def test_an_adapter_update_reaches_the_device_which_serves_the_merged_models_outputs(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    """v1: the unmerged base (a whole model); v2: the coded adapter change alone, activated on the loaded session."""
    reg, address = registry
    agent = make_agent(tmp_path, address, reg, adapter_mode="unmerged")
    x = target_data().tensors[0][:64].numpy()
    base = unmerged_base()
    try:
        assert deploy(reg, agent, {FP32_UNMERGED: base, "fp32": BundleFile(base_onnx())}) == FP32_UNMERGED
        update, target = _v2(base)
        assert deploy(reg, agent, {FP32_ADAPTER: update, FP32_UNMERGED: BundleFile(target, "onnx", "fp32",
                                                                                    base.metadata)}) == FP32_ADAPTER
        logits, version = agent.predict(x)
        assert version == 2 and np.abs(logits - merged_logits(adapter_tensors(target), x)).max() <= 1e-4
        deployed = [e for e in wait_until(lambda: [e for e in events(reg) if e["status"] == "deployed"
                                                   and e["version"] == "2"], what="v2's event") if e]
        assert deployed[0]["format"] == FP32_ADAPTER and deployed[0]["adapter_mode"] == "unmerged"
        assert int(deployed[0]["bytes_fetched"]) == len(update.data) < 0.05 * len(target)  # the change, nothing else
        assert (agent.workdir / "models" / "v000002" / f"{FP32_ADAPTER}.bin").read_bytes() == target

        served = agent.serving.served
        assert served is not None

        class Broken:
            runtime = "onnxruntime-cpu"

            def predict(self, x: np.ndarray) -> np.ndarray:
                return np.full((len(x), 10), np.nan, dtype=np.float32)

        object.__setattr__(served, "model", Broken())  # v2's adapter fails in the field: back to v1's
        wait_until(lambda: agent.serving_version == 1, what="rollback to v1's adapter")
        np.testing.assert_allclose(agent.predict(x)[0], merged_logits(adapter_tensors(base.data), x), atol=1e-4)
    finally:
        agent.stop()


def test_after_a_restart_the_device_serves_its_last_verified_base_and_adapter(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agent = make_agent(tmp_path, address, reg, adapter_mode="merged")
    base = unmerged_base()
    update, target = _v2(base)
    try:
        assert deploy(reg, agent, {FP32_UNMERGED: base}) == FP32_UNMERGED
        assert deploy(reg, agent, {FP32_ADAPTER: update}) == FP32_ADAPTER
    finally:
        agent.stop()
    again = make_agent(tmp_path, "127.0.0.1:1", reg, adapter_mode="merged")  # registry unreachable: from disk
    x = target_data().tensors[0][:16].numpy()
    try:
        logits, version = again.predict(x)
        assert version == 2 and served_format(again) == FP32_ADAPTER
        assert np.abs(logits - merged_logits(adapter_tensors(target), x)).max() <= 1e-4
    finally:
        again.stop()


def test_adapter_updates_for_another_base_or_corrupt_are_refused_and_the_device_keeps_serving(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    reg, address = registry
    agent = make_agent(tmp_path, address, reg, adapter_mode="merged")
    other = make_agent(tmp_path, address, reg, "cam-merged", adapter_updates=False)  # serves merged models only
    x = target_data().tensors[0][:16].numpy()
    base = unmerged_base()
    try:
        reg.publish({FP32_UNMERGED: base, "fp32": BundleFile(base_onnx())})
        wait_until(lambda: agent.serving_version == other.serving_version == 1, what="both on v1")
        assert (served_format(agent), served_format(other)) == (FP32_UNMERGED, "fp32")
        before, _ = agent.predict(x)

        # v2: an update made against another base (the unmerged graph with another adapter)
        elsewhere = with_adapter(base.data, adapter_state(lora_model(scale=0.05, seed=7)))
        wrong, _ = adapter_update(elsewhere, 1, adapter_state(lora_model(scale=0.02)), CODEC)
        reg.publish({FP32_ADAPTER: wrong})
        wait_until(lambda: 2 in agent.rejected and 2 in other.rejected, what="an update for another base refused")
        assert "updates apply only to what it serves" in agent.rejected[2]

        # v3: the right base's update, but against a version this device does not serve
        update, target = _v2(base)
        reg.publish({FP32_ADAPTER: dataclasses.replace(update, metadata={**update.metadata, "base_version": 7})})
        wait_until(lambda: 3 in agent.rejected, what="an update for another version refused")
        assert "updates apply only to what it serves" in agent.rejected[3]

        # v4: a corrupt update: damaged after coding, then signed (so the download verifies, the envelope does not)
        payload = bytearray(update.data)
        payload[-8] ^= 0xFF
        reg.publish({FP32_ADAPTER: dataclasses.replace(update, data=bytes(payload))})
        wait_until(lambda: 4 in agent.rejected, what="a corrupt update refused")
        assert "adapter update does not apply" in agent.rejected[4] and "checksum" in agent.rejected[4]
        after, version = agent.predict(x)
        assert version == 1
        np.testing.assert_array_equal(before, after)  # still v1, unchanged

        # v5: the update against v1 beside the whole models: each device takes what applies to what it serves
        merged_v5 = BundleFile(base_onnx())  # (any whole fp32 model will do for the device that takes one)
        reg.publish({FP32_ADAPTER: update, FP32_UNMERGED: BundleFile(target, "onnx", "fp32", base.metadata),
                     "fp32": merged_v5})
        wait_until(lambda: agent.serving_version == other.serving_version == 5, what="both on v5")
        assert (served_format(agent), served_format(other)) == (FP32_ADAPTER, "fp32")
        fetched = {e["format"]: int(e["bytes_fetched"]) for e in events(reg) if e["status"] == "deployed"
                   and e["version"] == "5"}
        assert fetched == {FP32_ADAPTER: len(update.data), "fp32": len(merged_v5.data)}
        assert np.abs(agent.predict(x)[0] - merged_logits(adapter_tensors(target), x)).max() <= 1e-4
    finally:
        agent.stop()
        other.stop()


def test_a_tensorrt_engine_of_the_unmerged_graph_takes_an_adapter_by_refit() -> None:
    from fedge.edge import tensorrt_engine

    usable, reason = tensorrt_engine.available()
    if not usable:
        pytest.skip(f"refitting an adapter into a TensorRT engine needs TensorRT and a CUDA GPU: {reason}")
    base = unmerged_base()
    _, target = _v2(base)
    x = target_data().tensors[0][:16].numpy()
    model = tensorrt_engine.TensorRTModel.from_onnx(base.data, "fp32")
    refitted = model.with_adapter(adapter_tensors(target))  # no rebuild: the plan's copy, its LoRA weights refitted
    assert np.abs(refitted.predict(x) - merged_logits(adapter_tensors(target), x)).max() < 1e-3
    assert np.abs(model.predict(x) - merged_logits(adapter_tensors(base.data), x)).max() < 1e-3  # untouched
