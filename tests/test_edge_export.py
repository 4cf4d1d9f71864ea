"""Export: ONNX reproduces PyTorch, the batch stays dynamic, INT8/FP16 variants keep their promises."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from _edge_support import seeded_model, target_data, trained_model
from onnx import numpy_helper
from peft import LoraConfig, get_peft_model

from fedge.edge.export import accuracy, export_model, quantize_int8_dynamic, run_onnx, to_onnx
from fedge.edge.weights import (
    WeightUpdateError,
    apply_initializers,
    changed_initializers,
    decode_weights,
    encode_weights,
)
from fedge.scenario import load_scenario
from fedge.sim.digits_shift import DigitsShift


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    sets = [target_data(4, p) for p in range(4)]
    return torch.cat([s.tensors[0] for s in sets]), torch.cat([s.tensors[1] for s in sets])


@pytest.fixture(scope="module")
def exported(data):  # type: ignore[no-untyped-def]
    """Evaluated on the partitions' held-out test splits, INT8 calibrated on their training splits (as `fedge export`)."""
    model = trained_model()
    x, y = data
    calibration = torch.cat([load_scenario("digits-shift").client_data(p, 4).train.tensors[0] for p in range(4)])[:512]
    return model, export_model(model, x, y, calibration_x=calibration, architecture="digits-cnn")


def test_onnx_matches_pytorch_with_dynamic_batch(exported, data) -> None:  # type: ignore[no-untyped-def]
    model, result = exported
    assert result.metadata["max_abs_diff_vs_torch"] < 1e-4
    graph_input = onnx.load_from_string(result.fp32).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed batch
    for n in (1, 33):
        x = data[0][:n]
        with torch.no_grad():
            expected = model(x).numpy()
        got = run_onnx(result.fp32, x.numpy())
        assert got.shape == (n, 10)
        assert np.abs(got - expected).max() < 1e-4


def test_int8_qdq_is_small_keeps_accuracy_and_is_tensorrt_shaped(exported) -> None:  # type: ignore[no-untyped-def]
    _, result = exported
    meta = result.metadata
    assert meta["int8_mode"] == "qdq" and meta["int8_bytes_ratio"] <= 0.35
    assert len(result.int8) == meta["int8_bytes"]
    assert abs(meta["int8_accuracy"] - meta["fp32_accuracy"]) <= 0.01
    graph = onnx.load_from_string(result.int8).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"ConvInteger", "DynamicQuantizeLinear"}
    zero_points = [t for t in graph.initializer if t.name.endswith("zero_point")]
    assert zero_points and all(not numpy_helper.to_array(t).any() for t in zero_points)  # symmetric, as TensorRT needs


def test_int8_weights_are_7_bit_so_no_x86_kernel_saturates(exported) -> None:  # type: ignore[no-untyped-def]
    """x86 without VNNI sums pairs of u8 x s8 products in int16; with |w| <= 64 no pair can reach its limit.

    The machine a test runs on may have VNNI (and then never shows the loss), so the property itself is checked:
    every int8 weight that a DequantizeLinear reads lies in [-64, 64].
    """
    _, result = exported
    graph = onnx.load_from_string(result.int8).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = {n.input[0]: init[n.input[0]] for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in init and init[n.input[0]].dtype == np.int8}
    assert len(weights) >= 4  # conv1, conv2, fc1, fc2
    ranges = {name: (int(w.min()), int(w.max())) for name, w in weights.items()}
    assert all(-64 <= lo and hi <= 64 for lo, hi in ranges.values()), ranges
    assert max(max(-lo, hi) for lo, hi in ranges.values()) >= 60  # 7 bits used, not fewer


def test_int8_dynamic_needs_no_calibration_and_keeps_accuracy(exported, data) -> None:  # type: ignore[no-untyped-def]
    _, result = exported
    x, y = data[0].numpy(), data[1].numpy()
    int8 = quantize_int8_dynamic(result.fp32)
    assert len(int8) <= 0.35 * len(result.fp32)
    assert abs(accuracy(int8, x, y) - result.metadata["fp32_accuracy"]) <= 0.01


def test_fp16_halves_the_weights_and_stays_close(exported) -> None:  # type: ignore[no-untyped-def]
    _, result = exported
    meta = result.metadata
    assert meta["fp16_bytes"] < 0.55 * len(result.fp32)
    assert meta["fp16_max_abs_diff_vs_fp32"] < 0.05
    assert abs(meta["fp16_accuracy"] - meta["fp32_accuracy"]) <= 0.01


def test_lora_adapters_are_merged_into_the_export(data) -> None:  # type: ignore[no-untyped-def]
    base = seeded_model(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(DigitsShift.lora_targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # non-zero B: the adapter changes the output
    x = data[0][:16]
    onnx_bytes = to_onnx(peft_model, x[:2])
    names = [i.name for i in onnx.load_from_string(onnx_bytes).graph.initializer]
    assert not any("lora" in n for n in names)
    with torch.no_grad():
        expected = peft_model(x).numpy()
    assert np.abs(run_onnx(onnx_bytes, x.numpy()) - expected).max() < 1e-4
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())  # the caller's model is untouched


def test_weight_only_update_rebuilds_the_new_model(exported, data) -> None:  # type: ignore[no-untyped-def]
    model, result = exported
    x = data[0][:8]
    new_model = copy.deepcopy(model)
    with torch.no_grad():  # only the head changes, as with a head-only adapter
        new_model.fc2.weight.add_(0.01)
        new_model.fc2.bias.sub_(0.01)
    old, new = result.fp32, to_onnx(new_model, x)
    changes = changed_initializers(old, new)
    assert set(changes) == {"fc2.weight", "fc2.bias"}
    payload = encode_weights(changes)
    assert len(payload) < 0.01 * len(new)
    rebuilt = apply_initializers(old, decode_weights(payload))
    np.testing.assert_array_equal(run_onnx(rebuilt, x.numpy()), run_onnx(new, x.numpy()))


def test_refit_refuses_a_different_graph(exported) -> None:  # type: ignore[no-untyped-def]
    _, result = exported
    other = onnx.load_from_string(result.fp32)
    relu = next(n for n in other.graph.node if n.op_type == "Relu")
    relu.op_type = "Sigmoid"  # same weights, different computation
    with pytest.raises(WeightUpdateError, match="graph structure"):
        changed_initializers(result.fp32, other.SerializeToString())
