"""Adapter updates: the change of an unmerged graph's adapter, coded like a client's update, and applying it.

An unmerged graph (`fedge.edge.adapters.export`) holds its adapter as overridable
initializers: graph inputs with a default. An adapter update of version N is the
change from the adapter of version N-1 to N's, run through one of fedge's codecs
and wrapped in the update envelope (`fedge.envelope`: codec id and version,
tensor specs, sha256), so a device validates it exactly as the server validates
a client's upload. What it applies to and what it must yield are signed:
`base_sha256` is the graph the device must serve (version N-1's unmerged model,
whose initializers are N-1's adapter), `target_sha256` the graph after the change
(N's unmerged model, byte for byte: only the adapter's initializers differ). The
device checks the whole result, graph and adapter, not only the payload. A lossy
codec defines the version's adapter: it is N-1's plus the decoded change, on the
server as on every device, and the version's other formats are exported from it.

Torch-free: the edge agent applies updates with numpy, onnx and the codecs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from fedge.codecs import Codec, build_codec
from fedge.edge.artifacts import ADAPTER_KIND, BundleFile, sha256_hex
from fedge.edge.weights import WeightUpdateError, apply_initializers
from fedge.envelope import decode_update, encode_update, expected_specs

#: a format's signed metadata key that marks an unmerged graph (adapter updates apply to it) and describes its adapter
ADAPTER_META = "adapter"
#: format names in a version: the unmerged fp32 graph (a whole model) and the adapter update against the last version
FP32_UNMERGED, FP32_ADAPTER = "fp32-unmerged", "fp32-adapter"


def default_codec() -> Codec:
    """FedZip keeping every value (z = 1): 64 k-means levels per tensor, entropy-coded cluster ids.

    An adapter update is applied once, with no error feedback to make up for what a codec drops, so it keeps
    every value: FedZip's round setting (top 20%, 3 levels) loses accuracy when it codes a whole federation's
    change at once, and 64 levels cost about as much as q4 while agreeing with the uncoded adapter far more
    closely (docs/edge.md has the measurements).
    """
    return build_codec("fedzip", z=1.0, clusters=64)


class AdapterError(ValueError):
    """An adapter update that does not fit the graph it names (other tensors, shapes or dtypes)."""


def adapter_tensors(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    """The graph's adapter: its overridable initializers (graph inputs with a default), by name."""
    graph = onnx.load_from_string(onnx_bytes).graph
    inputs = {i.name for i in graph.input}
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in inputs}


def with_adapter(onnx_bytes: bytes, tensors: Mapping[str, np.ndarray]) -> bytes:
    """The unmerged graph with `tensors` as its adapter's defaults (every adapter tensor, each of its shape and dtype)."""
    held = adapter_tensors(onnx_bytes)
    if set(tensors) != set(held):
        raise AdapterError(f"adapter tensors differ from the graph's: missing {sorted(set(held) - set(tensors))[:3]}, "
                           f"unexpected {sorted(set(tensors) - set(held))[:3]}")
    try:
        return apply_initializers(onnx_bytes, dict(tensors))
    except WeightUpdateError as err:
        raise AdapterError(str(err)) from err


def bake(onnx_bytes: bytes) -> bytes:
    """The graph with its adapter as constants: ONNX Runtime then folds a "weight" form layer's W + s·B·A into one
    weight when the session loads, so the model runs as fast as the merged one (merging on the device)."""
    model = onnx.load_from_string(onnx_bytes)
    defaults = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in defaults]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model.SerializeToString()


def adapter_update(base: bytes, base_version: int, adapter: Mapping[str, np.ndarray], codec: Codec) -> tuple[BundleFile, bytes]:
    """The coded change from `base`'s adapter (served as `base_version`) to `adapter`, and the graph it yields.

    The yielded graph holds base's adapter plus the *decoded* change (what every device will compute), which is
    the version's adapter from then on.
    """
    held = adapter_tensors(base)
    if set(adapter) != set(held) or any(np.shape(adapter[k]) != held[k].shape for k in held):
        raise AdapterError("the new adapter's tensors differ from the base graph's (names or shapes): push a whole model")
    change = {k: np.asarray(adapter[k], np.float32) - held[k] for k in held}
    payload, decoded = encode_update(change, codec)
    target = with_adapter(base, {k: held[k] + decoded[k] for k in held})
    meta = {"base_version": base_version, "base_sha256": sha256_hex(base), "target_sha256": sha256_hex(target),
            "target_bytes": len(target), "codec": codec.name, "codec_params": codec.params(), "parameters": int(sum(v.size for v in held.values())),
            "dense_bytes": int(sum(4 * v.size for v in held.values()))}
    return BundleFile(payload, ADAPTER_KIND, "fp32", meta), target


def apply_adapter_update(base: bytes, payload: bytes) -> bytes:
    """`base` (the unmerged graph a device serves) with the envelope's change added to its adapter.

    Raises `fedge.envelope.EnvelopeError` (with its reason: checksum, spec-mismatch, bad-payload, non-finite, ...)
    for a payload that must not be applied; the caller checks the result against the signed target.
    """
    held = adapter_tensors(base)
    change = decode_update(payload, expected_specs(held), max_bytes=len(payload))
    return with_adapter(base, {k: held[k] + change[k] for k in held})
