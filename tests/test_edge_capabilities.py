"""Device facts and the agreement rules a device holds a format to (pure functions: no processes, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge.agreement import ReferenceError, Thresholds, agreement, read_reference_set, reference_set
from fedge.edge.artifacts import ArtifactError, BundleFile, Manifest, make_manifest
from fedge.edge.capabilities import (
    INT8_KERNELS,
    Capabilities,
    cpu_features,
    describe,
    detect,
    int8_kernel,
    isa_facts,
    preferred_precisions,
)

HASWELL = {"SSE41": True, "AVX": True, "AVX2": True, "FMA3": True, "F16C": True, "AVX512F": False}
CASCADE_LAKE = {**HASWELL, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}
SKYLAKE_SP = {**HASWELL, "AVX512F": True, "AVX512BW": True}
CORTEX_A53 = {"NEON": True, "ASIMD": True}
NEOVERSE_N1 = {"NEON": True, "ASIMD": True, "ASIMDHP": True, "ASIMDDP": True}


@pytest.mark.parametrize(("features", "kernel"), [
    (CASCADE_LAKE, "vnni"), (HASWELL, "pmaddubsw"), (SKYLAKE_SP, "pmaddubsw"), (NEOVERSE_N1, "sdot"),
    (CORTEX_A53, "neon"), ({}, "none"),
])
def test_the_int8_kernel_follows_the_instruction_set(features: dict[str, bool], kernel: str) -> None:
    isa = isa_facts(features)
    assert int8_kernel(isa) == kernel and kernel in INT8_KERNELS
    assert all(features[f] for f in isa)  # only what the CPU has, in a fixed order


def test_this_machine_is_described_from_cpuid() -> None:
    caps = detect()
    features = cpu_features()
    assert caps.isa == isa_facts(features) and caps.int8_kernel == int8_kernel(caps.isa)
    assert caps.memory_bytes >= caps.memory_available_bytes > 0 and "CPUExecutionProvider" in caps.providers
    assert caps.machine in describe(caps) and describe(caps) == describe(caps.as_dict())


def _caps(features: dict[str, bool]) -> Capabilities:
    isa = isa_facts(features)
    return Capabilities("x86_64", "", isa, int8_kernel(isa), ("CPUExecutionProvider",), 1, 1, "1.0")


def test_precisions_follow_runtime_and_cpu() -> None:
    assert preferred_precisions("onnxruntime-cpu", _caps(HASWELL)) == ("int8", "fp16", "fp32")  # 7-bit: safe here
    assert preferred_precisions("onnxruntime-cpu", _caps(NEOVERSE_N1)) == ("int8", "fp16", "fp32")
    assert preferred_precisions("onnxruntime-cpu", _caps({})) == ("fp16", "fp32")
    assert preferred_precisions("onnxruntime-cuda", _caps(HASWELL)) == ("fp16", "fp32")
    assert preferred_precisions("tensorrt", _caps(HASWELL)) == ("int8", "fp16", "fp32")


def test_agreement_is_judged_on_top1_and_on_the_logit_difference() -> None:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(0, 4, (200, 10)).astype(np.float32)
    rules = Thresholds(min_top1=0.95, max_relative_diff=0.3)
    close = agreement(fp32 + rng.normal(0, 0.05, fp32.shape).astype(np.float32), fp32)
    assert close.top1 > 0.95 and close.samples == 200 and not rules.failures(close)
    scaled = agreement(2 * fp32, fp32)  # same argmax everywhere, logits twice as large
    assert scaled.top1 == 1.0 and any("logit range" in r for r in rules.failures(scaled))
    shuffled = agreement(fp32[::-1].copy(), fp32)
    assert shuffled.top1 < 0.5 and any("top-1 agreement" in r for r in rules.failures(shuffled))
    with pytest.raises(ValueError):
        agreement(fp32[:10], fp32)


def test_a_reference_set_round_trips_and_malformed_ones_are_refused() -> None:
    x = np.random.default_rng(1).normal(size=(8, 1, 4, 4)).astype(np.float32)
    weights = np.random.default_rng(2).normal(size=(16, 3)).astype(np.float32)

    def fp32(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) @ weights

    data = reference_set(fp32, x)
    inputs, logits = read_reference_set(data)
    assert inputs.dtype == np.float32 and np.abs(inputs - x).max() < 1e-2  # stored as float16
    np.testing.assert_array_equal(logits, fp32(inputs))  # the logits of exactly the stored inputs
    assert len(data) < x.nbytes + logits.nbytes  # float16 inputs: smaller than float32 ones
    big = reference_set(fp32, x * 1e6)  # beyond float16's range: kept as float32
    np.testing.assert_array_equal(read_reference_set(big)[0], x * 1e6)
    with pytest.raises(ReferenceError):
        read_reference_set(b"not safetensors")
    from safetensors.numpy import save

    with pytest.raises(ReferenceError, match="inputs and logits"):
        read_reference_set(save({"inputs": x}))


def test_a_manifest_names_every_format_and_refuses_what_a_device_could_not_use() -> None:
    manifest = make_manifest(3, {"fp32": BundleFile(b"a" * 10), "int8": BundleFile(b"b", precision="int8"),
                                 "reference": BundleFile(b"r", "reference", "")}, {"k": 1})
    assert Manifest.parse(manifest.canonical()) == manifest
    assert set(manifest.models()) == {"fp32", "int8"} and manifest.total_bytes == 12
    bad = [
        ({"fp32": BundleFile(b"a", precision="int4")}, "precision"),
        ({"a/b": BundleFile(b"a")}, "plain name"),
        ({"plan": BundleFile(b"a", "tensorrt", "fp16")}, "device class"),
        ({"fp32": BundleFile(b"a", "onnx-weights")}, "weight-only"),
        ({"fp32-adapter": BundleFile(b"a", "onnx-adapter")}, "adapter update needs"),
        ({"reference": BundleFile(b"r", "reference", "")}, "at least one model"),
    ]
    for formats, reason in bad:
        with pytest.raises(ArtifactError, match=reason):
            make_manifest(1, formats)
    with pytest.raises(ArtifactError, match="schema"):
        Manifest.parse(manifest.canonical().replace(b'"schema":2', b'"schema":1'))
