"""Weight-only updates between two ONNX exports of one graph: the changed initializers, and applying them.

Kept free of torch so the edge agent (which applies such updates) starts fast;
the same payload is what a TensorRT refit consumes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


class WeightUpdateError(ValueError):
    """The two models differ in more than weights, or an update names weights the model lacks."""


def initializers(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(onnx_bytes).graph.initializer}


def changed_initializers(old: bytes, new: bytes, atol: float = 0.0) -> dict[str, np.ndarray]:
    """Initializers of `new` that differ from `old`: the payload of a weight-only (refit) update.

    Raises if the graphs differ in anything but weights, since then a refit is not possible.
    """
    a, b = initializers(old), initializers(new)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in a):
        raise WeightUpdateError("the two exports differ in their initializers' names, shapes or dtypes; rebuild, do not refit")
    if _graph_signature(old) != _graph_signature(new):
        raise WeightUpdateError("the two exports differ in graph structure; rebuild, do not refit")
    return {k: b[k] for k in b if not np.allclose(a[k], b[k], rtol=0.0, atol=atol)}


def apply_initializers(onnx_bytes: bytes, changes: dict[str, np.ndarray]) -> bytes:
    """The model with `changes` replacing its initializers, each keeping its dtype and shape (a scalar that came
    back from safetensors as shape (1,) is a scalar again; a different dtype or size is refused)."""
    model = onnx.load_from_string(onnx_bytes)
    by_name = {t.name: t for t in model.graph.initializer}
    missing = set(changes) - set(by_name)
    if missing:
        raise WeightUpdateError(f"weight update names unknown initializers: {sorted(missing)[:5]}")
    for name, array in changes.items():
        old = by_name[name]
        shape, dtype = tuple(old.dims), onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        if array.dtype != dtype or array.size != int(np.prod(shape)):
            raise WeightUpdateError(f"{name}: update is {array.dtype}{list(array.shape)}, the model's is {dtype}{list(shape)}")
        old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array).reshape(shape), name))
    return model.SerializeToString()


def encode_weights(changes: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in changes.items()})


def decode_weights(payload: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(payload))


def _graph_signature(onnx_bytes: bytes) -> bytes:
    model = onnx.load_from_string(onnx_bytes)
    del model.graph.initializer[:]
    return model.SerializeToString()


