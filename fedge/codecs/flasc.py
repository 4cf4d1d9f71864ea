"""FLASC (Kuo, Raje et al.): one global top-k over all adapter tensors together, values kept exact.

Unlike FedZip's per-layer budget, the global selection lets tensors whose
update is large take more of the budget. Values go as fp32 (or fp16), the
positions through the shared entropy-coded gap stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.codecs.base import Encoded, SparseDecoding, TensorSpec, flat_f32, fmt_float, specs_of, to_fraction
from fedge.codecs.primitives.frame import PayloadReader, PayloadWriter
from fedge.codecs.primitives.positions import read_positions, write_positions
from fedge.codecs.primitives.select import keep_count, topk_indices
from fedge.codecs.registry import register_codec

_VALUE_DTYPES = {"float32": "<f4", "float16": "<f2"}


@register_codec
class FlascCodec(SparseDecoding):
    """Payload sections: values (all kept entries, tensor by tensor), counts, positions.

    `density` is the paper's d (the fraction of all adapter entries sent); the
    same codec serves the sparse download (d_down) and upload (d_up).
    """

    name = "flasc"
    version = 1

    def __init__(self, density: float = 1 / 16, value_dtype: str = "float32") -> None:
        self.density = to_fraction(density, "flasc density")
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"flasc value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {value_dtype!r}")
        self.value_dtype = value_dtype

    def params(self) -> dict[str, str]:
        return {"density": fmt_float(self.density), "value_dtype": self.value_dtype}

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded:
        specs = specs_of(update)
        flats = [flat_f32(a) for a in update.values()]
        everything = np.concatenate(flats) if flats else np.zeros(0, np.float32)
        chosen = topk_indices(np.abs(everything), keep_count(everything.size, self.density))
        offsets = np.cumsum([0] + [f.size for f in flats])
        cuts = np.searchsorted(chosen, offsets)
        indices = [chosen[a:b] - off for a, b, off in zip(cuts[:-1], cuts[1:], offsets[:-1], strict=True)]
        writer = PayloadWriter()
        writer.add("values", everything[chosen].astype(_VALUE_DTYPES[self.value_dtype]))
        write_positions(writer, indices)
        return Encoded(writer.payload(), specs, writer.sections)

    def kept(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, list[np.ndarray]]:
        reader = PayloadReader(payload)
        values_blob = reader.take("values")
        indices = read_positions(reader, specs, overall=self.density)
        reader.finish()
        total = sum(i.size for i in indices)
        values = PayloadReader.as_array(values_blob, "values", _VALUE_DTYPES[self.value_dtype], total)
        return values.astype(np.float32), indices
